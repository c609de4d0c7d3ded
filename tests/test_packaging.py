"""The wheel carries the Lua scripts: build it, install it into a fresh virtual environment and
run a task from a directory outside the checkout."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

from tests.conftest import ROOT


def test_wheel_installs_and_runs_a_task_outside_the_checkout(tmp_path: Path, server) -> None:
    # Given a wheel built from the checkout
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next(dist.glob("coretask-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    lua = {Path(n).name for n in names if n.startswith("coretask/gateway/lua/") and n.endswith(".lua")}
    assert {"_lib.lua", "enqueue.lua", "fetch.lua", "complete.lua"} <= lua
    assert "coretask/py.typed" in names
    # the pytest plugin is registered through its entry point (docs/testing.md)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "[pytest11]\ncoretask = coretask.testing" in zipfile.ZipFile(wheel).read(entry_points).decode()
    dashboard = {n for n in names if n.startswith("coretask/dashboard/")}
    assert {"coretask/dashboard/templates/coretask_dashboard/base.html", "coretask/dashboard/static/dashboard.css",
            "coretask/dashboard/static/dashboard.js"} <= dashboard, sorted(dashboard)

    # When it is installed into a fresh venv and used from a directory outside the checkout
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "jobs.py").write_text(textwrap.dedent(f"""
        import redis, redis.cluster
        def add(url: str, a: int, b: int) -> None:
            client = (redis.cluster.RedisCluster if {server.cluster!r} else redis.Redis).from_url(url)
            client.set("wheel-test-result", a + b)
    """))
    (work / "main.py").write_text(textwrap.dedent(f"""
        import threading, time, sys
        import redis, redis.cluster, coretask, jobs
        assert "site-packages" in coretask.__file__, coretask.__file__
        url = {server.url!r}
        p = coretask.TaskProcessor(coretask.Options(redis=url, cluster={server.cluster!r}, prefix="{{wheel-test}}"))
        p.enqueue_task("default", "t", jobs.add, url, 2, 3)
        stop = threading.Event()
        t = threading.Thread(target=p.run, args=(stop,)); t.start()
        client = (redis.cluster.RedisCluster if {server.cluster!r} else redis.Redis).from_url(url)
        deadline = time.time() + 20
        while client.get("wheel-test-result") is None and time.time() < deadline:
            time.sleep(0.05)
        stop.set(); t.join()
        print("RESULT", client.get("wheel-test-result").decode())
    """))
    out = subprocess.run([str(py), "main.py"], cwd=work, capture_output=True, text=True, timeout=120)

    # Then the task ran with the installed package (and its Lua scripts)
    assert out.returncode == 0, out.stderr
    assert "RESULT 5" in out.stdout
