#!/usr/bin/env python3
"""End-to-end checks of `larder chat` (src/cli/chat.cpp), fed through a pipe (one message a line).

SmolLM2-135M-Instruct (ChatML template in its GGUF metadata; `scripts/models --path smollm2`), greedy:
  * three turns with /reset between the second and third: every reply is non-empty, the second turn
    reuses the KV of the first turn's prompt and reply (only the new message is prefilled, from the
    --verbose stats on stderr), and after /reset nothing is reused and the same question gets the
    same answer as in the first turn;
  * SIGINT while a long reply streams stops that reply (fewer tokens than -n, "interrupted"), the
    session goes on, the partial reply is part of the history (the next turn reuses it) and the next
    turn gets a reply; SIGINT at the prompt quits with the summary line.
stories260K (no chat template): the built-in ChatML fallback is announced in one stderr line and
the session works; --chat-template picks a built-in or a file; a bad one is a one-line error; on a
terminal (pty) the "> " prompt is shown and Ctrl-C at the prompt quits.

Environment: LARDER_BIN, LARDER_SHARED, LARDER_MODELS. Exit 77 when SmolLM2 is not cached (fetch it
with `scripts/models smollm2`), after the stories260K checks."""
import os
import pty
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.environ.get("LARDER_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SHARED = os.environ.get("LARDER_SHARED", os.path.join(ROOT, "..", "shared"))
BIN = os.environ.get("LARDER_BIN", os.path.join(ROOT, "build", "bin", "larder"))
STORIES = os.path.join(SHARED, "models", "stories260K", "stories260K-f32.gguf")

TURN = re.compile(r"turn (\d+): prompt (\d+) tokens, (\d+) reused, (\d+) prefilled .*?; reply (\d+) tokens.*?(, interrupted)?$")
failures = []


def check(name, cond, detail=""):
    print(f"  {'PASS' if cond else 'FAIL'}  {name}" + (f"  [{detail}]" if detail and not cond else ""), flush=True)
    if not cond:
        failures.append(name)
    return cond


def smollm2_path():
    try:
        p = subprocess.run([os.path.join(ROOT, "scripts", "models"), "--path", "smollm2"], capture_output=True,
                           text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else ""
    return path if path and os.path.isfile(path) else None


def chat(args, lines, timeout=600):
    p = subprocess.run([BIN, "chat"] + args, input="".join(l + "\n" for l in lines).encode(), capture_output=True,
                       timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def turns(err):
    """[(turn, prompt, reused, prefilled, reply, interrupted)] from the --verbose lines."""
    out = []
    for line in err.splitlines():
        m = TURN.search(line)
        if m:
            out.append(tuple(int(m.group(i)) for i in range(1, 6)) + (m.group(6) is not None,))
    return out


def stories_checks():
    print("stories260K (no chat template: built-in fallback)")
    base = ["-m", STORIES, "--temp", "0", "-n", "16", "-t", "2", "-c", "256", "-v"]
    rc, out, err = chat(base + ["-sys", "You tell stories."], ["Hello", "Tell me more", "/exit", "never read"])
    notes = [l for l in err.splitlines() if "no chat template" in l]
    check("fallback announced in one stderr line naming ChatML", len(notes) == 1 and "ChatML" in notes[0], err[-600:])
    t = turns(err)
    check("two turns before /exit, exit status 0", rc == 0 and len(t) == 2, f"rc {rc} {t} {err[-400:]}")
    if len(t) == 2:
        check("replies generated", t[0][4] > 0 and t[1][4] > 0 and out.strip() != "", f"{t} {out!r}")
        check("second turn reuses the first turn's prompt", t[1][2] >= t[0][1], str(t))
    check("summary line at the end", "larder chat: 2 turns; prompt" in err, err[-300:])

    rc, out, err = chat(base + ["--chat-template", "gemma", "--system-prompt", "Be kind."], ["Hi"])
    t = turns(err)
    check("--chat-template gemma (a built-in by name)", rc == 0 and len(t) == 1 and "chat template gemma" in err
          and "no chat template" not in err, err[-400:])
    with tempfile.TemporaryDirectory() as tmp:
        tf = os.path.join(tmp, "t.jinja")
        with open(tf, "w") as f:
            f.write("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant:{% endif %}")
        rc, out, err = chat(base + ["--chat-template", tf], ["Once upon a time"])
        t = turns(err)
        # BOS + "user: Once upon a time\nassistant:" is more than the 6 tokens of BOS + the message.
        check("--chat-template FILE renders the conversation", rc == 0 and len(t) == 1 and t[0][1] > 6, err[-400:])
        with open(tf, "w") as f:
            f.write("{% for m in messages %}")
        rc, out, err = chat(base + ["--chat-template", tf], ["Hi"])
        lines = [l for l in err.splitlines() if l.startswith("larder: error:")]
        check("a broken --chat-template file is a one-line error", rc != 0 and len(lines) == 1 and tf in lines[0], err[-300:])
    rc, out, err = chat(base + ["--chat-template", "/nonexistent/x.jinja"], ["Hi"])
    check("a missing --chat-template is an error", rc != 0 and "neither a built-in" in err, err[-300:])


def pty_session():
    """On a terminal: the "> " prompt, a reply, then Ctrl-C (typed as ^C) at the prompt quits."""
    print("stories260K on a terminal (pty)")
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(BIN, [BIN, "chat", "-m", STORIES, "--temp", "0", "-n", "8", "-t", "1", "-c", "256"])
    buf = b""

    def read_until(pred, timeout):
        nonlocal buf
        end = time.time() + timeout
        while not pred(buf) and time.time() < end:
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
        return pred(buf)

    try:
        check("prompt shown on a terminal", read_until(lambda b: b"> " in b, 60), repr(buf[-300:]))
        os.write(fd, b"Hello\n")
        check("reply, then the prompt again", read_until(lambda b: b.count(b"> ") >= 2 and b"Hello" in b, 60),
              repr(buf[-300:]))
        os.write(fd, b"\x03")
        read_until(lambda b: b" turn; prompt" in b, 30)
        end, status = time.time() + 30, None
        while time.time() < end:
            wpid, st = os.waitpid(pid, os.WNOHANG)
            if wpid:
                status = os.waitstatus_to_exitcode(st)
                break
            time.sleep(0.05)
        check("Ctrl-C at the prompt quits with status 0", status == 0 and b"1 turn; prompt" in buf,
              f"status {status} {buf[-300:]!r}")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def smollm2_turns(model):
    print("SmolLM2: three turns with /reset, greedy")
    q1 = "What is the capital of France?"
    rc, out, err = chat(["-m", model, "--temp", "0", "-n", "64", "-t", "2", "-c", "1024", "-v"],
                        [q1, "And of Germany?", "/reset", q1])
    t = turns(err)
    if not check("exit 0 with three turns", rc == 0 and len(t) == 3, f"rc {rc} {t} {err[-800:]}"):
        return
    print(f"    turns (n, prompt, reused, prefilled, reply, interrupted): {t}")
    check("no built-in fallback (the model has a template)", "no chat template" not in err, err[-300:])
    check("every reply is non-empty", all(x[4] > 0 for x in t) and out.strip() != "", f"{t} {out!r}")
    check("first turn reuses nothing", t[0][2] == 0, str(t))
    # The second turn's prompt starts with the first turn's prompt and reply: all but a few tokens at
    # the end of the reply (the token that ended it is never decoded) must come from the KV.
    check("second turn reuses the first turn's prompt and reply",
          t[1][2] >= t[0][1] + t[0][4] - 3 and t[1][3] < t[1][1] - t[0][1], str(t))
    check("/reset: the third turn reuses nothing", t[2][2] == 0, str(t))
    check("/reset: same question, same prompt and answer as the first turn", t[2][1] == t[0][1] and t[2][4] == t[0][4],
          str(t))
    check("history cleared reported", "history cleared" in err, err[-300:])
    # Fresh conversation, greedy: the last reply is the first one again.
    first = out.split("\n")[0]
    check("the answer after /reset repeats the first answer", first != "" and first in out[len(first):], repr(out))


class Reader(threading.Thread):
    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.data, self.lock = stream, b"", threading.Lock()
        self.start()

    def run(self):
        while True:
            b = os.read(self.stream.fileno(), 4096)
            if not b:
                return
            with self.lock:
                self.data += b

    def text(self):
        with self.lock:
            return self.data.decode("utf-8", "replace")

    def wait_for(self, pred, timeout):
        end = time.time() + timeout
        while time.time() < end:
            if pred(self.text()):
                return True
            time.sleep(0.02)
        return pred(self.text())


def smollm2_interrupt(model):
    print("SmolLM2: SIGINT while a reply streams, then another turn")
    n = 400
    p = subprocess.Popen([BIN, "chat", "-m", model, "--temp", "0", "-n", str(n), "-t", "2", "-c", "2048", "-v"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = Reader(p.stdout), Reader(p.stderr)
    try:
        p.stdin.write(b"Write a very long story about a dragon who learns to fly, with many chapters.\n")
        p.stdin.flush()
        streaming = out.wait_for(lambda s: len(s) >= 20, 300)
        check("the reply streams before it ends", streaming and not turns(err.text()), out.text()[-200:])
        p.send_signal(signal.SIGINT)
        done = err.wait_for(lambda s: len(turns(s)) >= 1, 120)
        t = turns(err.text())
        if not check("the interrupted turn ends", done and p.poll() is None, err.text()[-600:]):
            return
        check("the reply was cut short", t[0][5] and 0 < t[0][4] < n and "reply interrupted" in err.text(), str(t))
        p.stdin.write(b"Say hello.\n")
        p.stdin.flush()
        err.wait_for(lambda s: len(turns(s)) >= 2, 300)
        t = turns(err.text())
        print(f"    turns (n, prompt, reused, prefilled, reply, interrupted): {t}")
        if check("the next turn works", len(t) == 2 and t[1][4] > 0 and not t[1][5], err.text()[-600:]):
            check("the partial reply stayed in the history (reused from the KV)",
                  t[1][2] >= t[0][1] + t[0][4] - 3, str(t))
        # SIGINT at the prompt (waiting for input) quits, with the summary.
        p.send_signal(signal.SIGINT)
        try:
            rc = p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rc = None
        err.wait_for(lambda s: "2 turns; prompt" in s, 5)
        check("SIGINT at the prompt quits with status 0 and the summary", rc == 0 and "2 turns; prompt" in err.text(),
              f"rc {rc} {err.text()[-300:]}")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def main():
    if not os.access(BIN, os.X_OK):
        print(f"larder binary not found: {BIN} (set LARDER_BIN)")
        return 1
    have_stories = os.path.exists(STORIES)
    if have_stories:
        stories_checks()
        pty_session()
    else:
        print(f"stories260K missing ({STORIES}): fallback checks skipped")
    model = smollm2_path()
    if model is None:
        print("SKIP: SmolLM2-135M-Instruct is not cached (scripts/models --path smollm2 failed; "
              "fetch it with scripts/models smollm2)")
        return 1 if failures else 77
    smollm2_turns(model)
    smollm2_interrupt(model)
    for f in failures:
        print("FAILED: " + f)
    print(f"{len(failures)} failed")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
