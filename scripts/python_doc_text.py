#!/usr/bin/python3
"""Plain text of pages of the Python library reference shipped by Debian's python3-doc package.

    scripts/python_doc_text.py [PAGE.html ...] [--doc-dir DIR] [--max-chars N] [-o OUT]

Reads DIR/PAGE (default DIR: /usr/share/doc/python3/html/library, the python3-doc package; pages
default to DEFAULT_PAGES) and prints the text of each page's main body: headings, paragraphs,
list items, table cells and definition terms as lines of text with runs of whitespace collapsed
to one space; code examples (<pre>) line by line with their indentation, trailing spaces dropped;
the navigation, sidebar, footer, scripts, styles and the pilcrow header links left out. Pages are
separated by one blank line. Deterministic: the same files give the same bytes (stdlib html.parser
only; no locale, time or dict-order dependence). --max-chars cuts the result at the last line end
at or before N characters. Exit 1 with a message when the documentation is not installed.
"""

import argparse
import html.parser
import os
import re
import sys

DOC_DIRS = ["/usr/share/doc/python3/html/library", "/usr/share/doc/python3-doc/html/library"]
DEFAULT_PAGES = ["json.html", "functions.html"]

BLOCK = {"p", "div", "section", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "tr", "td", "th",
         "table", "ul", "ol", "dl", "blockquote", "br", "caption", "figure", "hr"}
SKIP = {"script", "style", "head", "title"}
SKIP_CLASSES = {"headerlink", "sphinxsidebar", "related", "footer", "navigation", "clearer"}


class _Text(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth_main = 0          # > 0 inside <div role="main"> (Sphinx's document body)
        self.skip = []               # stack of tags whose content is skipped (with nesting)
        self.pre = 0
        self.lines = []
        self.cur = []

    def _flush(self):
        s = "".join(self.cur)
        self.cur = []
        if self.pre:
            for line in s.split("\n"):
                self.lines.append(line.rstrip())
        else:
            s = re.sub(r"\s+", " ", s).strip()
            if s:
                self.lines.append(s)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.skip:
            self.skip.append(tag)
            return
        if self.depth_main == 0:
            if tag == "div" and a.get("role") == "main":
                self.depth_main = 1
            return
        if tag == "div":
            self.depth_main += 1
        classes = set((a.get("class") or "").split())
        if tag in SKIP or classes & SKIP_CLASSES:
            if tag == "div":
                self.depth_main -= 1
            self.skip.append(tag)
            return
        if tag == "pre":
            self._flush()
            self.pre += 1
        elif tag in BLOCK:
            self._flush()

    def handle_endtag(self, tag):
        if self.skip:
            self.skip.pop()
            return
        if self.depth_main == 0:
            return
        if tag == "pre":
            self._flush()
            self.pre = max(0, self.pre - 1)
        elif tag in BLOCK:
            self._flush()
        if tag == "div":
            self.depth_main -= 1
            if self.depth_main == 0:
                self._flush()

    def handle_data(self, data):
        if self.skip or self.depth_main == 0:
            return
        self.cur.append(data)


def page_text(path):
    with open(path, encoding="utf-8") as f:
        p = _Text()
        p.feed(f.read())
        p.close()
    p._flush()
    # Blank lines collapse to one; leading/trailing blank lines dropped.
    out, blank = [], False
    for line in p.lines:
        if not line.strip():
            blank = bool(out)
            continue
        if blank:
            out.append("")
            blank = False
        out.append(line)
    return "\n".join(out) + "\n"


def find_doc_dir(explicit=None):
    for d in ([explicit] if explicit else DOC_DIRS):
        if d and os.path.isdir(d):
            return d
    return None


def python_doc_text(pages=None, doc_dir=None, max_chars=None):
    d = find_doc_dir(doc_dir)
    if d is None:
        raise FileNotFoundError("Python library reference not found in %s (apt-get install python3-doc)"
                                % ", ".join([doc_dir] if doc_dir else DOC_DIRS))
    text = "\n".join(page_text(os.path.join(d, p)) for p in (pages or DEFAULT_PAGES))
    if max_chars is not None and len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars + 1)
        text = text[:cut + 1] if cut >= 0 else text[:max_chars]
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pages", nargs="*", help="page file names in the library directory (default: %s)"
                    % " ".join(DEFAULT_PAGES))
    ap.add_argument("--doc-dir")
    ap.add_argument("--max-chars", type=int)
    ap.add_argument("-o", "--output")
    a = ap.parse_args(argv)
    try:
        text = python_doc_text(a.pages or None, a.doc_dir, a.max_chars)
    except (OSError, UnicodeDecodeError) as e:
        print("python_doc_text: error: %s" % e, file=sys.stderr)
        return 1
    if a.output:
        with open(a.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
