#include "chat/jinja/lexer.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include "chat/jinja/unicode.h"
#include "chat/jinja/value.h"

namespace larder::jinja {
namespace {

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_name_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool is_name_char(char c) { return is_name_start(c) || is_digit(c); }

class Lexer {
 public:
  explicit Lexer(std::string src) : s_(std::move(src)) {}

  std::vector<Token> run() {
    while (pos_ < s_.size()) root();
    push(Tok::Eof, "");
    return std::move(toks_);
  }

 private:
  std::string s_;
  size_t pos_ = 0;
  int line_ = 1;
  bool line_starting_ = true;  // the previous match ended with a newline (jinja2's lstrip rule)
  std::vector<Token> toks_;

  [[noreturn]] void error(const std::string& msg) { fail("line " + std::to_string(line_) + ": " + msg); }

  void push(Tok t, std::string text) { toks_.push_back(Token{t, std::move(text), 0, 0, line_}); }

  void advance_to(size_t p) {
    for (size_t k = pos_; k < p; ++k)
      if (s_[k] == '\n') ++line_;
    pos_ = p;
  }

  bool at(size_t p, std::string_view lit) const { return s_.compare(p, lit.size(), lit) == 0; }

  // Length of the Python-whitespace run (\s, Unicode-aware) starting at p.
  size_t space_run(size_t p) const {
    size_t q = p;
    while (q < s_.size()) {
      size_t k = q;
      if (!uni::is_space(uni::next(s_, k))) break;
      q = k;
    }
    return q - p;
  }

  static std::string rstrip(const std::string& t) {
    // str.rstrip(): drop trailing Unicode whitespace, decoding backwards via a forward scan.
    size_t keep = 0;
    for (size_t i = 0; i < t.size();) {
      uint32_t c = uni::next(t, i);
      if (!uni::is_space(c)) keep = i;
    }
    return t.substr(0, keep);
  }

  // Applies {%- / lstrip_blocks to the text before a tag (jinja2's OptionalLStrip).
  std::string strip_text(std::string text, char sign, bool is_variable) const {
    if (sign == '-') return rstrip(text);
    if (sign == '+' || is_variable) return text;
    size_t nl = text.rfind('\n');
    size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
    if ((l_pos > 0 || line_starting_) && l_pos < text.size()) {
      if (space_run_in(text, l_pos) == text.size() - l_pos) text.resize(l_pos);
    }
    return text;
  }

  static size_t space_run_in(const std::string& t, size_t p) {
    size_t q = p;
    while (q < t.size()) {
      size_t k = q;
      if (!uni::is_space(uni::next(t, k))) break;
      q = k;
    }
    return q - p;
  }

  void root() {
    size_t p = pos_;
    for (;;) {
      p = s_.find('{', p);
      if (p == std::string::npos || p + 1 >= s_.size()) {
        push(Tok::Data, s_.substr(pos_));
        advance_to(s_.size());
        return;
      }
      char k = s_[p + 1];
      if (k == '{' || k == '%' || k == '#') break;
      ++p;
    }
    char kind = s_[p + 1];
    size_t q = p + 2;
    char sign = 0;
    if (q < s_.size() && (s_[q] == '-' || s_[q] == '+')) sign = s_[q++];
    size_t raw_end = kind == '%' ? match_raw_begin(q) : 0;
    std::string text = strip_text(s_.substr(pos_, p - pos_), sign, kind == '{');
    if (!text.empty()) push(Tok::Data, std::move(text));
    advance_to(p);
    if (raw_end) {
      advance_to(raw_end);
      line_starting_ = s_[raw_end - 1] == '\n';
      raw_body();
      return;
    }
    advance_to(q);
    line_starting_ = false;
    if (kind == '#') {
      comment();
    } else {
      tag(kind == '%');
    }
  }

  // `{%(-|+|)\s*raw\s*(?:-%}\s*|%})` continuing at q; returns the end offset or 0.
  size_t match_raw_begin(size_t q) const {
    q += space_run(q);
    if (!at(q, "raw")) return 0;
    q += 3;
    q += space_run(q);
    if (at(q, "-%}")) return q + 3 + space_run(q + 3);
    if (at(q, "%}")) return q + 2;
    return 0;
  }

  void raw_body() {
    size_t start = pos_;
    for (size_t p = s_.find("{%", start); p != std::string::npos; p = s_.find("{%", p + 1)) {
      size_t q = p + 2;
      char sign = 0;
      if (q < s_.size() && (s_[q] == '-' || s_[q] == '+')) sign = s_[q++];
      q += space_run(q);
      if (!at(q, "endraw")) continue;
      q += 6;
      q += space_run(q);
      size_t end = 0;
      if (at(q, "+%}")) {
        end = q + 3;
      } else if (at(q, "-%}")) {
        end = q + 3 + space_run(q + 3);
      } else if (at(q, "%}")) {
        end = q + 2 + (q + 2 < s_.size() && s_[q + 2] == '\n');
      } else {
        continue;
      }
      std::string text = strip_text(s_.substr(start, p - start), sign, false);
      if (!text.empty()) push(Tok::Data, std::move(text));
      advance_to(end);
      line_starting_ = s_[end - 1] == '\n';
      return;
    }
    error("Missing end of raw directive");
  }

  void comment() {
    for (size_t p = pos_; p < s_.size(); ++p) {
      size_t end = 0;
      if ((s_[p] == '+') && at(p + 1, "#}")) {
        end = p + 3;
      } else if (s_[p] == '-' && at(p + 1, "#}")) {
        end = p + 3 + space_run(p + 3);
      } else if (at(p, "#}")) {
        end = p + 2 + (p + 2 < s_.size() && s_[p + 2] == '\n');
      } else {
        continue;
      }
      advance_to(end);
      line_starting_ = s_[end - 1] == '\n';
      return;
    }
    error("Missing end of comment tag");
  }

  void tag(bool block) {
    push(block ? Tok::BlockBegin : Tok::VarBegin, "");
    std::string balance;
    for (;;) {
      if (pos_ >= s_.size())
        error(block ? "unexpected end of template, expected '%}'" : "unexpected end of template, expected '}}'");
      if (balance.empty()) {
        size_t end = 0;
        if (block) {
          if (at(pos_, "+%}")) {
            end = pos_ + 3;
          } else if (at(pos_, "-%}")) {
            end = pos_ + 3 + space_run(pos_ + 3);
          } else if (at(pos_, "%}")) {
            end = pos_ + 2 + (pos_ + 2 < s_.size() && s_[pos_ + 2] == '\n');
          }
        } else {
          if (at(pos_, "-}}")) {
            end = pos_ + 3 + space_run(pos_ + 3);
          } else if (at(pos_, "}}")) {
            end = pos_ + 2;
          }
        }
        if (end) {
          push(block ? Tok::BlockEnd : Tok::VarEnd, "");
          advance_to(end);
          line_starting_ = s_[end - 1] == '\n';
          return;
        }
      }
      if (size_t ws = space_run(pos_)) {
        advance_to(pos_ + ws);
        continue;
      }
      if (number()) continue;
      char c = s_[pos_];
      if (is_name_start(c)) {
        size_t q = pos_;
        while (q < s_.size() && is_name_char(s_[q])) ++q;
        push(Tok::Name, s_.substr(pos_, q - pos_));
        advance_to(q);
        continue;
      }
      if (c == '\'' || c == '"') {
        string_literal();
        continue;
      }
      operator_token(balance);
    }
  }

  // Digits with single '_' separators between digit groups: (\d+_)*\d+
  size_t digit_run(size_t p, int base = 10) const {
    auto ok = [&](char ch) {
      if (base == 16) return is_digit(ch) || ((ch | 32) >= 'a' && (ch | 32) <= 'f');
      if (base == 8) return ch >= '0' && ch <= '7';
      if (base == 2) return ch == '0' || ch == '1';
      return is_digit(ch);
    };
    size_t q = p;
    if (q >= s_.size() || !ok(s_[q])) return 0;
    while (q < s_.size()) {
      if (ok(s_[q])) {
        ++q;
      } else if (s_[q] == '_' && q + 1 < s_.size() && ok(s_[q + 1])) {
        q += 2;
      } else {
        break;
      }
    }
    return q - p;
  }

  static std::string no_underscores(std::string_view t) {
    std::string r;
    for (char c : t)
      if (c != '_') r += c;
    return r;
  }

  bool number() {
    size_t p = pos_;
    if (!is_digit(s_[p])) return false;
    // float_re first: (?<!\.) digits ( (.digits)? e[+-]?digits | .digits )
    if (p == 0 || s_[p - 1] != '.') {
      size_t q = p + digit_run(p);
      size_t frac = 0;
      if (q < s_.size() && s_[q] == '.') frac = digit_run(q + 1);
      size_t after = frac ? q + 1 + frac : q;
      size_t e = 0;
      if (after < s_.size() && (s_[after] | 32) == 'e') {
        size_t r = after + 1;
        if (r < s_.size() && (s_[r] == '+' || s_[r] == '-')) ++r;
        if (size_t d = digit_run(r)) e = r + d - after;
      }
      if (e || frac) {
        size_t end = after + e;
        std::string t = no_underscores(std::string_view(s_).substr(p, end - p));
        Token tok{Tok::Float, t, 0, std::strtod(t.c_str(), nullptr), line_};
        toks_.push_back(tok);
        advance_to(end);
        return true;
      }
    }
    // integer_re: 0b/0o/0x prefixes, [1-9](_?\d)*, 0(_?0)*
    size_t end = 0;
    int base = 10;
    std::string digits;
    if (s_[p] == '0' && p + 1 < s_.size() && std::string_view("bBoOxX").find(s_[p + 1]) != std::string_view::npos) {
      char k = s_[p + 1] | 32;
      base = k == 'b' ? 2 : k == 'o' ? 8 : 16;
      size_t q = p + 2;
      if (q < s_.size() && s_[q] == '_') ++q;
      size_t d = digit_run(q, base);
      if (d) {
        end = q + d;
        digits = no_underscores(std::string_view(s_).substr(p + 2, end - p - 2));
      }
    }
    if (!end) {
      base = 10;
      if (s_[p] == '0') {
        size_t q = p + 1;
        while (q < s_.size()) {
          if (s_[q] == '0') {
            ++q;
          } else if (s_[q] == '_' && q + 1 < s_.size() && s_[q + 1] == '0') {
            q += 2;
          } else {
            break;
          }
        }
        end = q;
      } else {
        end = p + digit_run(p);
      }
      digits = no_underscores(std::string_view(s_).substr(p, end - p));
    }
    errno = 0;
    char* stop = nullptr;
    unsigned long long v = std::strtoull(digits.c_str(), &stop, base);
    if (errno == ERANGE || v > static_cast<unsigned long long>(INT64_MAX)) error("integer literal too large");
    Token tok{Tok::Int, s_.substr(p, end - p), static_cast<int64_t>(v), 0, line_};
    toks_.push_back(tok);
    advance_to(end);
    return true;
  }

  static int hexval(char c) {
    if (is_digit(c)) return c - '0';
    c |= 32;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  }

  // Python's "unicode-escape" decoding of a literal body, after jinja2 has turned non-ASCII
  // characters into \x/\u/\U escapes (so a backslash before one escapes only the backslash).
  std::string unescape(std::string_view body) {
    std::string out;
    for (size_t i = 0; i < body.size();) {
      char c = body[i];
      if (c != '\\') {
        size_t start = i;
        uni::next(body, i);
        out.append(body.substr(start, i - start));
        continue;
      }
      if (i + 1 >= body.size()) error("\\ at end of string");
      char e = body[i + 1];
      if (static_cast<unsigned char>(e) >= 0x80) {
        size_t k = i + 1;
        uint32_t cp = uni::next(body, k);
        char buf[16];
        if (cp <= 0xFF) {
          std::snprintf(buf, sizeof buf, "\\x%02x", cp);
        } else if (cp <= 0xFFFF) {
          std::snprintf(buf, sizeof buf, "\\u%04x", cp);
        } else {
          std::snprintf(buf, sizeof buf, "\\U%08x", cp);
        }
        out += buf;
        i = k;
        continue;
      }
      i += 2;
      switch (e) {
        case '\n':
          break;
        case '\\':
          out += '\\';
          break;
        case '\'':
          out += '\'';
          break;
        case '"':
          out += '"';
          break;
        case 'a':
          out += '\a';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'v':
          out += '\v';
          break;
        case 'x':
        case 'u':
        case 'U': {
          int n = e == 'x' ? 2 : e == 'u' ? 4 : 8;
          uint32_t cp = 0;
          for (int k = 0; k < n; ++k) {
            int h = i + k < body.size() ? hexval(body[i + k]) : -1;
            if (h < 0) error(std::string("truncated \\") + e + "XXXX escape");
            cp = cp * 16 + static_cast<uint32_t>(h);
          }
          if (cp > 0x10FFFF) error("illegal Unicode character");
          i += n;
          uni::append(out, cp);
          break;
        }
        case 'N':
          error("\\N{...} escapes are not supported");
        default:
          if (e >= '0' && e <= '7') {
            uint32_t cp = e - '0';
            for (int k = 0; k < 2 && i < body.size() && body[i] >= '0' && body[i] <= '7'; ++k)
              cp = cp * 8 + (body[i++] - '0');
            uni::append(out, cp);
          } else {
            out += '\\';
            out += e;
          }
      }
    }
    return out;
  }

  void string_literal() {
    char quote = s_[pos_];
    size_t q = pos_ + 1;
    while (q < s_.size() && s_[q] != quote) q += (s_[q] == '\\') ? 2 : 1;
    if (q >= s_.size()) error(std::string("unexpected char '") + quote + "'");
    std::string value = unescape(std::string_view(s_).substr(pos_ + 1, q - pos_ - 1));
    push(Tok::String, std::move(value));
    advance_to(q + 1);
  }

  void operator_token(std::string& balance) {
    static const char* kTwo[] = {"//", "**", "==", "!=", ">=", "<="};
    for (const char* op : kTwo) {
      if (at(pos_, op)) {
        push(Tok::Op, op);
        advance_to(pos_ + 2);
        return;
      }
    }
    char c = s_[pos_];
    if (std::string_view("+-/*%~[](){}><=.:|,;").find(c) == std::string_view::npos) {
      char buf[8];
      if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7F) {
        std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned char>(c));
      } else {
        buf[0] = c;
        buf[1] = 0;
      }
      error(std::string("unexpected char '") + buf + "'");
    }
    if (c == '(' || c == '[' || c == '{') {
      balance.push_back(c == '(' ? ')' : c == '[' ? ']' : '}');
    } else if (c == ')' || c == ']' || c == '}') {
      if (balance.empty()) error(std::string("unexpected '") + c + "'");
      if (balance.back() != c) error(std::string("unexpected '") + c + "', expected '" + balance.back() + "'");
      balance.pop_back();
    }
    push(Tok::Op, std::string(1, c));
    advance_to(pos_ + 1);
  }
};

// \r\n, \r and \n become \n; one trailing newline is dropped (keep_trailing_newline=False).
std::string normalize_newlines(const std::string& in) {
  std::string out;
  out.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] == '\r') {
      out += '\n';
      if (i + 1 < in.size() && in[i + 1] == '\n') ++i;
    } else {
      out += in[i];
    }
  }
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

}  // namespace

std::vector<Token> tokenize(const std::string& source) { return Lexer(normalize_newlines(source)).run(); }

}  // namespace larder::jinja
