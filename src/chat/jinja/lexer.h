// Jinja2 tokenizer with the whitespace rules transformers renders chat templates with:
// trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False, plus {%- -%} {{- -}} {#- -#}
// and {%+ +%}. Text and comments are resolved here; the parser sees data and tag tokens only.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace larder::jinja {

enum class Tok { Data, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, Eof };

struct Token {
  Tok type;
  std::string text;  // Data text, Name, Op, or the unescaped String value
  int64_t ival = 0;
  double fval = 0;
  int line = 1;
};

// Throws JinjaError on malformed input (unterminated tags/strings/comments, stray characters).
std::vector<Token> tokenize(const std::string& source);

}  // namespace larder::jinja
