#!/usr/bin/python3
"""Chat templates, checked against Python's jinja2: renders every template in
shared/templates/*.jinja over a set of conversations with jinja2 configured exactly as
transformers' apply_chat_template configures it (ImmutableSandboxedEnvironment, trim_blocks,
lstrip_blocks, loopcontrols, its tojson/raise_exception/strftime_now), writes the cases and
expected strings to a JSON file, and runs the gtest ChatTemplateCases.MatchJinja2 on it, which
requires byte-identical output from larder's engine (and an error wherever jinja2 raised).

Env: LARDER_TESTS_BIN (the gtest binary; default LARDER_SOURCE_DIR/build/tests/larder_tests),
LARDER_SHARED or LARDER_SOURCE_DIR/../shared. Exit 77 only if the shared templates are missing.
"""

import copy
import glob
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

NOW = 1721997296  # 2024-07-26 12:34:56 UTC: the clock both sides give strftime_now()


def shared_dir():
    if os.environ.get("LARDER_SHARED"):
        return os.environ["LARDER_SHARED"]
    src = os.environ.get("LARDER_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    return os.path.join(src, "..", "shared")


def tests_bin():
    if os.environ.get("LARDER_TESTS_BIN"):
        return os.environ["LARDER_TESTS_BIN"]
    src = os.environ.get("LARDER_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    return os.path.join(src, "build", "tests", "larder_tests")


# ---------------------------------------------------------------- transformers' environment


class AssistantTracker(Extension):
    """transformers' {% generation %} tag: renders its body like a call block (no tracking here)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

    def _generation_support(self, caller):
        return caller()


def make_env():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers overrides jinja2's tojson (which HTML-escapes) with plain json.dumps
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.fromtimestamp(NOW).strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[AssistantTracker, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


# ---------------------------------------------------------------- conversations

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"},
            },
            "required": ["location"],
        },
    },
}

SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search_docs",
        "description": "Search the documentation",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look for", "maxLength": 200},
                "limit": {"type": "integer", "description": "Maximum hits", "default": 5, "minimum": 1},
                "tags": {"type": "array", "items": {"type": "string"}, "description": "Filter tags"},
                "filters": {"type": "object", "additionalProperties": {"type": "number"},
                            "description": "Numeric filters"},
                "exact": {"type": ["boolean", "null"], "description": "Exact match only"},
                "ratio": {"type": "number", "description": "Score cutoff", "examples": [0.5, 0.75]},
            },
            "required": ["query", "limit"],
        },
    },
}

UNICODE = "Grüße, 世界! 😀 — \"quoted\" 'single' back\\slash\ttab\nnew line"


def tool_call(name, args, as_string, call_id="call12345"):
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False) if as_string else args}}


def conversations():
    """(name, messages, extra) triples; each is rendered with add_generation_prompt False and True."""
    # functions/datetime are what the firefunction template reads instead of tools
    base = {"bos_token": "<s>", "eos_token": "</s>", "functions": json.dumps([WEATHER_TOOL["function"]]),
            "datetime": "Jul 26 2024"}
    c = []
    c.append(("user_only", [{"role": "user", "content": "Hello!"}], base))
    c.append(("system_user", [{"role": "system", "content": "You are a helpful assistant."},
                              {"role": "user", "content": "What is 2+2?"}], base))
    c.append(("multi_turn", [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello! How can I help?"},
                             {"role": "user", "content": "Tell me a joke."}], base))
    c.append(("multi_turn_no_system", [{"role": "user", "content": "  padded question  "},
                                       {"role": "assistant", "content": "An answer.\n"},
                                       {"role": "user", "content": "Follow-up?"},
                                       {"role": "assistant", "content": "<think>hmm</think>Sure."}], base))
    c.append(("unicode", [{"role": "system", "content": UNICODE},
                          {"role": "user", "content": UNICODE},
                          {"role": "assistant", "content": "¡Hola! ñ ü ß ø å — ok"},
                          {"role": "user", "content": "日本語で答えて"}], base))
    c.append(("empty_messages", [], base))
    c.append(("roles_not_alternating", [{"role": "user", "content": "one"},
                                        {"role": "user", "content": "two"}], base))
    c.append(("no_special_tokens", [{"role": "user", "content": "plain"}], {}))
    for as_string in (False, True):
        kind = "str_args" if as_string else "dict_args"
        tools = [WEATHER_TOOL, SEARCH_TOOL]
        c.append((f"tools_defined_{kind}", [{"role": "system", "content": "You can call tools."},
                                            {"role": "user", "content": "Weather in Paris?"}],
                  dict(base, tools=tools)))
        c.append((f"tool_roundtrip_{kind}", [
            {"role": "system", "content": "You can call tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None,
             "tool_calls": [tool_call("get_weather", {"location": "Paris", "unit": "celsius"}, as_string, "abc123def")]},
            {"role": "tool", "tool_call_id": "abc123def", "name": "get_weather", "content": "{\"temp\": 21}"},
            {"role": "assistant", "content": "It is 21°C in Paris."},
            {"role": "user", "content": "Thanks!"}], dict(base, tools=tools)))
        c.append((f"two_tool_calls_{kind}", [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": "",
             "tool_calls": [tool_call("get_weather", {"location": "Paris"}, as_string, "aaaaaaaa1"),
                            tool_call("get_weather", {"location": "Rome"}, as_string, "bbbbbbbb2")]},
            {"role": "tool", "tool_call_id": "aaaaaaaa1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "bbbbbbbb2", "content": "rainy"}], dict(base, tools=tools)))
    # Only plain JSON-schema types: SEARCH_TOOL's type list sends the Hermes and Command-R
    # type converters into unbounded recursion (an error in jinja2 and larder alike).
    for as_string in (False, True):
        kind = "str_args" if as_string else "dict_args"
        c.append((f"simple_tool_roundtrip_{kind}", [
            {"role": "system", "content": "Use tools when needed."},
            {"role": "user", "content": "Weather in Lisbon, in fahrenheit?"},
            {"role": "assistant", "content": None,
             "tool_calls": [tool_call("get_weather", {"location": "Lisbon", "unit": "fahrenheit"}, as_string, "xyz987654")]},
            {"role": "tool", "tool_call_id": "xyz987654", "name": "get_weather", "content": "70F, clear"},
            {"role": "assistant", "content": "It is 70°F and clear in Lisbon."}], dict(base, tools=[WEATHER_TOOL])))
    c.append(("tool_result_mapping", [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None,
         "tool_calls": [tool_call("get_weather", {"location": "Oslo"}, False, "ccccccccc")]},
        {"role": "tool", "tool_call_id": "ccccccccc", "content": {"temp": -3.5, "sky": "snow", "ok": True}}],
        dict(base, tools=[WEATHER_TOOL])))
    c.append(("builtin_tools", [
        {"role": "user", "content": "Search for llamas"},
        {"role": "assistant", "tool_calls": [tool_call("brave_search", {"query": "llamas"}, False)]},
        {"role": "ipython", "content": "Llamas are camelids."}],
        dict(base, builtin_tools=["brave_search", "wolfram_alpha", "code_interpreter"], tools=[WEATHER_TOOL])))
    c.append(("extra_vars", [{"role": "user", "content": "Date?"}],
              dict(base, date_string="01 Jan 2025", functions="[]", datetime="2025-01-01",
                   documents=[{"title": "Doc A", "text": "alpha"}, {"title": "Doc B", "text": "beta"}])))
    c.append(("system_only_tools_null", [{"role": "system", "content": "sys"},
                                         {"role": "user", "content": "q"}], dict(base, tools=None)))
    return c


def render(template, messages, agp, extra):
    ctx = dict(copy.deepcopy(extra))
    ctx["messages"] = copy.deepcopy(messages)
    ctx["add_generation_prompt"] = agp
    return template.render(**ctx)


def main():
    tdir = os.path.join(shared_dir(), "templates")
    paths = sorted(glob.glob(os.path.join(tdir, "*.jinja")))
    if not paths:
        print(f"SKIP: no templates in {tdir}")
        return 77
    binary = tests_bin()
    if not os.path.exists(binary):
        print(f"FAIL: gtest binary not found: {binary} (set LARDER_TESTS_BIN)")
        return 1
    env = make_env()
    cases = []
    for path in paths:
        name = os.path.basename(path)[:-len(".jinja")]
        with open(path, encoding="utf-8") as f:
            source = f.read()
        template = env.from_string(source)
        for conv, messages, extra in conversations():
            for agp in (False, True):
                case = {"template": name, "source": source, "case": f"{conv}/agp={int(agp)}", "messages": messages,
                        "add_generation_prompt": agp, "extra": extra, "now": NOW}
                try:
                    case["expected"] = render(template, messages, agp, extra)
                except Exception as e:  # jinja2 raised: larder must return an error too
                    case["error"] = f"{type(e).__name__}: {e}"
                cases.append(case)
    with tempfile.TemporaryDirectory() as tmp:
        cases_path = os.path.join(tmp, "chat_template_cases.json")
        with open(cases_path, "w", encoding="utf-8") as f:
            json.dump(cases, f, ensure_ascii=False)
        n_err = sum("error" in c for c in cases)
        print(f"{len(cases)} cases over {len(paths)} templates ({n_err} where jinja2 raises)")
        proc = subprocess.run([binary, "--gtest_filter=ChatTemplateCases.*"],
                              env=dict(os.environ, LARDER_JINJA_CASES=cases_path),
                              capture_output=True, text=True, timeout=600)
    sys.stdout.write(proc.stdout[-20000:])
    sys.stderr.write(proc.stderr[-5000:])
    if "chat template cases:" not in proc.stdout:
        print("FAIL: the gtest did not run the cases (skipped, filtered out, or crashed)")
        return 1
    if proc.returncode != 0:
        print(f"FAIL: {binary} exited with {proc.returncode}")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
