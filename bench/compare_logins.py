#!/usr/bin/env python3
"""A/B of logins: two wxgate binaries behind one WeChat stand-in, runs interleaved.

    python3 bench/compare_logins.py OLD_BINARY NEW_BINARY                  # fixed answer, c=64, 8 rounds
    python3 bench/compare_logins.py OLD NEW --connections 500 --delay 0.05  # WeChat after 50 ms
    python3 bench/compare_logins.py BIN BIN --new-setting session.max_sessions=20000 --fill 40s
                                                                            # one build, two settings

The host's speed drifts by a factor of two within an hour, so one versus.py run against another says
little about a change to the login path. Here both builds run at once, each with `workers = 1` and
its own SQLite file, behind the same nginx stand-in for `jscode2session` (versus.py's), and each round
runs `bench/login.lua` against one and then the other (the order alternates), after a discarded
warm-up. Prints every run and the medians: logins/s, wxgate's CPU per login (split into user space
and kernel, as versus.py splits it: a change to wxgate's code moves the first), p99.
"""

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import versus  # noqa: E402  (the benchmark's services, configs and wrk runner)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", default="8s")
    parser.add_argument("--delay", help="seconds WeChat takes to answer, e.g. 0.05 (default: at once)")
    parser.add_argument("--new-setting", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a line of the new instance's configuration, e.g. session.max_sessions=20000")
    parser.add_argument("--fill", help="load each instance this long before the rounds, e.g. 40s, so that "
                        "both start them with full stores")
    args = parser.parse_args()
    versus.ARGS = argparse.Namespace(smoke=False)
    versus.need_tools()
    versus.WORK = Path(tempfile.mkdtemp(prefix="wxgate-compare-logins-"))
    services = []
    try:
        wechat = versus.free_port()
        modules = [str(versus.ECHO_MODULE)] if args.delay else []
        conf = versus.nginx_conf("wechat", 1, versus.wechat_block(wechat, delay=args.delay), modules)
        services.append(versus.Service("wechat", conf, ready_port=wechat))
        gates = []
        for side, binary in (("old", args.old), ("new", args.new)):
            port, admin = versus.free_port(), versus.free_port()
            conf = versus.wxgate_conf(f"wxgate-{side}", port, admin, 9, 1, wechat)
            if side == "new":
                with_settings(conf, args.new_setting)
            gate = versus.Service(f"wxgate-{side}", [str(Path(binary).resolve()), "--config", str(conf)],
                                  ready_url=f"http://127.0.0.1:{admin}/readyz")
            services.append(gate)
            versus.login_token(port)  # correctness: a login through this stand-in works
            gates.append((side, gate, f"http://127.0.0.1:{port}"))
        script = versus.WORK / "login.lua"
        script.write_text((versus.ROOT / "bench/login.lua").read_text()
                          + (versus.ROOT / "bench/stats.lua").read_text())
        if args.fill:
            for _, _, url in gates:
                versus.wrk(url, args.connections, 2, args.fill, {}, script=script)
        runs = {"old": [], "new": []}
        for round_ in range(args.rounds):
            for side, gate, url in gates if round_ % 2 == 0 else gates[::-1]:
                versus.wrk(url, args.connections, 2, "2s", {}, script=script)
                before = versus.cpu_split(gate.pids())
                stats = versus.wrk(url, args.connections, 2, args.duration, {}, script=script)
                user, kernel = versus.per_request(before, versus.cpu_split(gate.pids()), stats)
                errors = versus.failed(stats)
                runs[side].append((stats["rps"], user + kernel, stats["p99"], user, kernel))
                print(f"round {round_ + 1} {side}: {stats['rps']:,.0f} logins/s, {user + kernel:.1f} µs CPU "
                      f"each ({user:.1f} user, {kernel:.1f} kernel), p99 {stats['p99'] / 1000:.1f} ms, "
                      f"{errors} errors", flush=True)
                if errors:
                    versus.fail(f"{side}: {errors} logins failed")
        for side, _, _ in gates:
            rps, cpu, p99, user, kernel = (statistics.median(r[i] for r in runs[side]) for i in range(5))
            print(f"{side}: median {rps:,.0f} logins/s, {cpu:.1f} µs CPU per login ({user:.1f} in user "
                  f"space, {kernel:.1f} in the kernel, each a median), p99 {p99 / 1000:.1f} ms")
    finally:
        for service in services:
            service.stop()
        shutil.rmtree(versus.WORK, ignore_errors=True)


def with_settings(conf, settings):
    """Adds each `section.key=value` to the configuration file `conf`, under its `[section]`."""
    text = conf.read_text()
    for setting in settings:
        name, _, value = setting.partition("=")
        section, _, key = name.strip().partition(".")
        if not key or not value or f"[{section}]\n" not in text:
            versus.fail(f"--new-setting {setting!r}: expected SECTION.KEY=VALUE with a section the "
                        "benchmark's configuration has")
        text = text.replace(f"[{section}]\n", f"[{section}]\n{key} = {value.strip()}\n", 1)
    conf.write_text(text)


if __name__ == "__main__":
    main()
