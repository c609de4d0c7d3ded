"""Bootstrap: ``python -m benchmarks [--short] [--runs N] [--only NAME,...]``.

Runs under any Python 3.11 (stdlib only). It makes sure ``benchmarks/.venv``
exists and holds the pinned versions from ``benchmarks/requirements.txt``
plus an editable install of coretask from this checkout, then re-executes
``python -m benchmarks.run ...`` with the venv's interpreter, so that all
measuring code imports the peer libraries from the venv.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

from . import REQUIREMENTS, ROOT, VENV_DIR
from .cli import build_parser

STATE_FILE = VENV_DIR / "bench-state.json"
PROJECT_FILES = ("pyproject.toml", "setup.py", "setup.cfg")


def _log(msg):
    print("[benchmarks] " + msg, file=sys.stderr, flush=True)


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _venv_python():
    return VENV_DIR / "bin" / "python"


def _load_state():
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def _save_state(state):
    STATE_FILE.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def _project_hash():
    """Hash of coretask's packaging metadata, or None while the checkout has none."""
    parts = []
    for name in PROJECT_FILES:
        path = ROOT / name
        if path.is_file():
            parts.append(name.encode() + b"\0" + path.read_bytes())
    return _sha256(b"\0\0".join(parts)) if parts else None


def _pip(*args):
    cmd = [str(_venv_python()), "-m", "pip", "--disable-pip-version-check", *args]
    _log("$ " + " ".join(cmd))
    return subprocess.call(cmd, cwd=str(ROOT), stdin=subprocess.DEVNULL)


def _constraints_file():
    """requirements.txt without extras, usable as a pip constraints file."""
    lines = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(re.sub(r"\[[^\]]*\]", "", line))
    fd, path = tempfile.mkstemp(prefix="bench-constraints-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def ensure_venv(force=False):
    req_hash = _sha256(REQUIREMENTS.read_bytes())
    py_tag = "%d.%d" % sys.version_info[:2]
    state = _load_state()
    fresh = (
        not force
        and _venv_python().exists()
        and state.get("requirements_sha256") == req_hash
        and state.get("python") == py_tag
    )
    if fresh:
        rc = subprocess.call([str(_venv_python()), "-c", "import rq, celery, dramatiq, huey, redis, psutil"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        fresh = rc == 0
    if not fresh:
        _log("creating %s (pinned requirements changed or venv missing)" % VENV_DIR)
        if subprocess.call([sys.executable, "-m", "venv", "--clear", str(VENV_DIR)]) != 0:
            sys.exit("benchmarks: could not create %s" % VENV_DIR)
        if _pip("install", "-qq", "-r", str(REQUIREMENTS)) != 0:
            sys.exit("benchmarks: pip install -r %s failed" % REQUIREMENTS)
        state = {"requirements_sha256": req_hash, "python": py_tag, "coretask": None}
        _save_state(state)

    proj = _project_hash()
    if proj is None:
        _log("no pyproject.toml/setup.py in %s yet: coretask is imported from the checkout via PYTHONPATH" % ROOT)
    elif state.get("coretask") != proj:
        _log("installing coretask from %s (editable)" % ROOT)
        cons = _constraints_file()
        try:
            rc = _pip("install", "-qq", "-c", cons, "-e", str(ROOT))
            if rc != 0:
                _log("editable install with pinned constraints failed; retrying with --no-deps")
                rc = _pip("install", "-qq", "--no-deps", "-e", str(ROOT))
        finally:
            os.unlink(cons)
        if rc == 0:
            state["coretask"] = proj
            _save_state(state)
        else:
            _log("WARNING: could not install coretask into the venv; relying on PYTHONPATH")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # validates and handles --help before any install
    ensure_venv(force=args.reinstall)
    argv = [a for a in argv if a != "--reinstall"]
    py = str(_venv_python())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["BENCH_IN_VENV"] = "1"
    env.pop("PYTHONHOME", None)
    os.chdir(str(ROOT))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(py, [py, "-m", "benchmarks.run", *argv], env)


if __name__ == "__main__":
    main()
