// Recursive-descent parser following jinja2/parser.py: the same precedence (filters bind
// tighter than arithmetic, `**` is left-associative), the same tuple rules, and the same
// statement set minus template inheritance/includes (not used by chat templates).
#include "chat/jinja/parser.h"

#include <algorithm>
#include <initializer_list>

#include "chat/jinja/builtins.h"
#include "chat/jinja/lexer.h"
#include "chat/jinja/stack.h"

namespace larder::jinja {
namespace {

constexpr int kMaxParseRecursion = 300;

class Parser {
 public:
  explicit Parser(std::vector<Token> toks) : t_(std::move(toks)) {}

  std::unique_ptr<Program> run() {
    auto prog = std::make_unique<Program>();
    prog->root = subparse({});
    return prog;
  }

 private:
  std::vector<Token> t_;
  size_t i_ = 0;
  int guard_ = 0;
  int block_depth_ = 0;
  int loop_depth_ = 0;
  std::vector<Stmt*> macro_stack_;

  struct Guard {
    Parser* p;
    explicit Guard(Parser* parser) : p(parser) {
      if (++p->guard_ > kMaxParseRecursion || stack_exhausted()) p->error("expression nested too deeply");
    }
    ~Guard() { --p->guard_; }
  };

  struct BlockGuard {
    Parser* p;
    explicit BlockGuard(Parser* parser) : p(parser) {
      if (++p->block_depth_ > kMaxBlockDepth || stack_exhausted()) p->error("blocks nested too deeply");
    }
    ~BlockGuard() { --p->block_depth_; }
  };

  const Token& cur() const { return t_[i_]; }
  const Token& peek() const { return t_[std::min(i_ + 1, t_.size() - 1)]; }
  void next() {
    if (t_[i_].type != Tok::Eof) ++i_;
  }
  bool is_op(const char* op) const { return cur().type == Tok::Op && cur().text == op; }
  bool is_name(const char* n) const { return cur().type == Tok::Name && cur().text == n; }

  static std::string describe(const Token& t) {
    switch (t.type) {
      case Tok::VarEnd:
        return "end of print statement";
      case Tok::BlockEnd:
        return "end of statement block";
      case Tok::Eof:
        return "end of template";
      case Tok::VarBegin:
        return "begin of print statement";
      case Tok::BlockBegin:
        return "begin of statement block";
      case Tok::Data:
        return "template data";
      case Tok::String:
        return "string";
      case Tok::Int:
        return "integer";
      case Tok::Float:
        return "float";
      default:
        return t.text;
    }
  }

  [[noreturn]] void error(const std::string& msg) const { fail("line " + std::to_string(cur().line) + ": " + msg); }

  void expect_op(const char* op) {
    if (!is_op(op)) error(std::string("expected token '") + op + "', got '" + describe(cur()) + "'");
    next();
  }
  std::string expect_name() {
    if (cur().type != Tok::Name) error("expected token 'name', got '" + describe(cur()) + "'");
    std::string n = cur().text;
    next();
    return n;
  }
  void expect_block_end() {
    if (cur().type != Tok::BlockEnd) error("expected token 'end of statement block', got '" + describe(cur()) + "'");
    next();
  }

  ExprPtr mk(EK k, int line, std::vector<ExprPtr> kids = {}) {
    auto e = std::make_unique<Expr>();
    e->k = k;
    e->line = line;
    e->kids = std::move(kids);
    finish(*e);
    return e;
  }
  void finish(Expr& e) {
    int d = 0;
    for (const auto& c : e.kids)
      if (c) d = std::max(d, c->depth);
    for (const auto& [n, c] : e.kwargs)
      if (c) d = std::max(d, c->depth);
    e.depth = d + 1;
    if (e.depth > kMaxExprDepth) error("expression nested too deeply");
  }
  static std::vector<ExprPtr> kids(ExprPtr a, ExprPtr b = nullptr, ExprPtr c = nullptr) {
    std::vector<ExprPtr> v;
    v.push_back(std::move(a));
    if (b) v.push_back(std::move(b));
    if (c) v.push_back(std::move(c));
    return v;
  }

  // ------------------------------------------------------------------ statements

  Body subparse(std::vector<std::string> ends) {
    Body body;
    for (;;) {
      const Token& tk = cur();
      switch (tk.type) {
        case Tok::Data: {
          auto s = std::make_unique<Stmt>();
          s->k = SK::Text;
          s->line = tk.line;
          s->text = tk.text;
          body.push_back(std::move(s));
          next();
          break;
        }
        case Tok::VarBegin: {
          int line = tk.line;
          next();
          auto s = std::make_unique<Stmt>();
          s->k = SK::Output;
          s->line = line;
          s->exprs.push_back(parse_tuple(false, true, {}));
          if (cur().type != Tok::VarEnd)
            error("expected token 'end of print statement', got '" + describe(cur()) + "'");
          next();
          body.push_back(std::move(s));
          break;
        }
        case Tok::BlockBegin: {
          next();
          if (cur().type != Tok::Name) error("tag name expected");
          if (std::find(ends.begin(), ends.end(), cur().text) != ends.end()) return body;
          body.push_back(parse_statement(ends));
          break;
        }
        case Tok::Eof: {
          if (!ends.empty()) {
            std::string want;
            for (size_t k = 0; k < ends.size(); ++k) want += (k ? " or '" : "'") + ends[k] + "'";
            error("Unexpected end of template. Jinja was looking for the following tags: " + want + ".");
          }
          return body;
        }
        default:
          error("unexpected '" + describe(tk) + "'");
      }
    }
  }

  StmtPtr stmt(SK k) {
    auto s = std::make_unique<Stmt>();
    s->k = k;
    s->line = cur().line;
    return s;
  }

  StmtPtr parse_statement(const std::vector<std::string>& ends) {
    const std::string n = cur().text;
    if (n == "for") return parse_for();
    if (n == "if") return parse_if();
    if (n == "set") return parse_set();
    if (n == "macro") return parse_macro();
    if (n == "call") return parse_call_block();
    if (n == "filter") return parse_filter_block();
    if (n == "with") return parse_with();
    if (n == "break" || n == "continue") {
      if (loop_depth_ == 0) error("'" + n + "' outside loop");
      auto s = stmt(n == "break" ? SK::Break : SK::Continue);
      next();
      expect_block_end();
      return s;
    }
    if (n == "generation") {  // transformers' AssistantTracker: renders its body in a child scope
      auto s = stmt(SK::Scope);
      next();
      expect_block_end();
      BlockGuard bg(this);
      int saved = loop_depth_;
      loop_depth_ = 0;
      s->bodies.push_back(subparse({"endgeneration"}));
      loop_depth_ = saved;
      next();
      expect_block_end();
      return s;
    }
    if (n == "print") {
      auto s = stmt(SK::Output);
      next();
      s->exprs.push_back(parse_tuple(false, true, {}));
      expect_block_end();
      return s;
    }
    static const char* kUnsupported[] = {"block", "extends", "include", "import", "from", "autoescape", "raw"};
    for (const char* u : kUnsupported)
      if (n == u) error("tag '" + n + "' is not supported");
    std::string msg = "Encountered unknown tag '" + n + "'.";
    if (!ends.empty()) {
      msg += " Jinja was looking for the following tags:";
      for (size_t k = 0; k < ends.size(); ++k) msg += (k ? " or '" : " '") + ends[k] + "'";
      msg += ".";
    }
    error(msg);
  }

  StmtPtr parse_for() {
    auto s = stmt(SK::For);
    next();
    s->exprs.push_back(parse_assign_target({"in"}));
    if (!is_name("in")) error("expected token 'in', got '" + describe(cur()) + "'");
    next();
    s->exprs.push_back(parse_tuple(false, false, {"recursive"}));
    if (is_name("if")) {
      next();
      s->exprs.push_back(parse_expression(true));
    } else {
      s->exprs.push_back(nullptr);
    }
    if (is_name("recursive")) error("recursive for loops are not supported");
    expect_block_end();
    BlockGuard bg(this);
    ++loop_depth_;
    s->bodies.push_back(subparse({"endfor", "else"}));
    --loop_depth_;
    if (cur().text == "else") {
      next();
      expect_block_end();
      s->bodies.push_back(subparse({"endfor"}));
    } else {
      s->bodies.emplace_back();
    }
    next();
    expect_block_end();
    return s;
  }

  StmtPtr parse_if() {
    auto s = stmt(SK::If);
    next();
    s->exprs.push_back(parse_tuple(false, false, {}));
    expect_block_end();
    BlockGuard bg(this);
    for (;;) {
      s->bodies.push_back(subparse({"elif", "else", "endif"}));
      std::string tag = cur().text;
      next();
      if (tag == "elif") {
        s->exprs.push_back(parse_tuple(false, false, {}));
        expect_block_end();
        continue;
      }
      if (tag == "else") {
        expect_block_end();
        s->bodies.push_back(subparse({"endif"}));
        next();
      }
      expect_block_end();
      return s;
    }
  }

  static bool can_assign(const Expr& e) {
    if (e.k == EK::Name || e.k == EK::NSRef) return true;
    if (e.k != EK::Tuple) return false;
    for (const auto& c : e.kids)
      if (!can_assign(*c)) return false;
    return true;
  }

  ExprPtr parse_assign_target(std::vector<std::string> extra_end) {
    ExprPtr t = parse_tuple(true, true, std::move(extra_end));
    if (!can_assign(*t)) error("can't assign to '" + describe_expr(*t) + "'");
    return t;
  }

  static std::string describe_expr(const Expr& e) {
    switch (e.k) {
      case EK::Const:
        return "Const";
      case EK::Tuple:
        return "Tuple";
      case EK::List:
        return "List";
      default:
        return "expression";
    }
  }

  StmtPtr parse_set() {
    auto s = stmt(SK::Set);
    next();
    ExprPtr target;
    if (cur().type == Tok::Name && peek().type == Tok::Op && peek().text == ".") {
      target = mk(EK::NSRef, cur().line);
      target->name = cur().text;
      next();
      next();
      target->value = Value::string(expect_name());
    } else {
      target = parse_assign_target({});
    }
    if (is_op("=")) {
      next();
      s->exprs.push_back(std::move(target));
      s->exprs.push_back(parse_tuple(false, true, {}));
      expect_block_end();
      return s;
    }
    s->k = SK::SetBlock;
    if (target->k == EK::Tuple) error("block assignment needs a name target");
    s->exprs.push_back(std::move(target));
    s->exprs.push_back(is_op("|") ? parse_filter(nullptr, false) : nullptr);
    expect_block_end();
    BlockGuard bg(this);
    s->bodies.push_back(subparse({"endset"}));
    next();
    expect_block_end();
    return s;
  }

  void parse_signature(Stmt& s) {
    expect_op("(");
    bool any_default = false;
    while (!is_op(")")) {
      if (!s.params.empty()) expect_op(",");
      s.params.push_back(expect_name());
      if (is_op("=")) {
        next();
        s.defaults.push_back(parse_expression(true));
        any_default = true;
      } else {
        if (any_default) error("non-default argument follows default argument");
        s.defaults.push_back(nullptr);
      }
    }
    next();
  }

  void parse_macro_body(Stmt& s, const char* end) {
    BlockGuard bg(this);
    int saved = loop_depth_;
    loop_depth_ = 0;
    macro_stack_.push_back(&s);
    s.bodies.push_back(subparse({end}));
    macro_stack_.pop_back();
    loop_depth_ = saved;
    next();
    expect_block_end();
  }

  StmtPtr parse_macro() {
    auto s = stmt(SK::Macro);
    next();
    s->name = expect_name();
    parse_signature(*s);
    expect_block_end();
    parse_macro_body(*s, "endmacro");
    return s;
  }

  StmtPtr parse_call_block() {
    auto s = stmt(SK::CallBlock);
    next();
    if (is_op("(")) parse_signature(*s);
    ExprPtr call = parse_expression(true);
    if (call->k != EK::Call) error("expected call");
    s->exprs.push_back(std::move(call));
    expect_block_end();
    parse_macro_body(*s, "endcall");
    return s;
  }

  StmtPtr parse_filter_block() {
    auto s = stmt(SK::FilterBlock);
    next();
    s->exprs.push_back(parse_filter(nullptr, true));
    expect_block_end();
    BlockGuard bg(this);
    s->bodies.push_back(subparse({"endfilter"}));
    next();
    expect_block_end();
    return s;
  }

  StmtPtr parse_with() {
    auto s = stmt(SK::With);
    next();
    while (cur().type != Tok::BlockEnd) {
      if (!s->exprs.empty()) expect_op(",");
      s->exprs.push_back(parse_assign_target({}));
      expect_op("=");
      s->exprs.push_back(parse_expression(true));
    }
    next();
    BlockGuard bg(this);
    s->bodies.push_back(subparse({"endwith"}));
    next();
    expect_block_end();
    return s;
  }

  // ------------------------------------------------------------------ expressions

  bool is_tuple_end(const std::vector<std::string>& extra) const {
    if (cur().type == Tok::VarEnd || cur().type == Tok::BlockEnd || is_op(")")) return true;
    return cur().type == Tok::Name && std::find(extra.begin(), extra.end(), cur().text) != extra.end();
  }

  ExprPtr parse_tuple(bool simplified, bool with_condexpr, std::vector<std::string> extra,
                      bool explicit_parens = false) {
    int line = cur().line;
    std::vector<ExprPtr> args;
    bool is_tuple = false;
    for (;;) {
      if (!args.empty()) expect_op(",");
      if (is_tuple_end(extra)) break;
      args.push_back(simplified ? parse_primary() : parse_expression(with_condexpr));
      if (is_op(",")) {
        is_tuple = true;
      } else {
        break;
      }
    }
    if (!is_tuple) {
      if (!args.empty()) return std::move(args[0]);
      if (!explicit_parens) error("Expected an expression, got '" + describe(cur()) + "'");
    }
    return mk(EK::Tuple, line, std::move(args));
  }

  ExprPtr parse_expression(bool with_condexpr) {
    Guard g(this);
    return with_condexpr ? parse_condexpr() : parse_or();
  }

  ExprPtr parse_condexpr() {
    int line = cur().line;
    ExprPtr expr1 = parse_or();
    while (is_name("if")) {
      next();
      ExprPtr test = parse_or();
      ExprPtr other;
      if (is_name("else")) {
        next();
        Guard g(this);
        other = parse_condexpr();
      }
      std::vector<ExprPtr> k;
      k.push_back(std::move(test));
      k.push_back(std::move(expr1));
      k.push_back(std::move(other));
      expr1 = mk(EK::CondExpr, line, std::move(k));
    }
    return expr1;
  }

  ExprPtr parse_or() {
    int line = cur().line;
    ExprPtr left = parse_and();
    while (is_name("or")) {
      next();
      left = mk(EK::Or, line, kids(std::move(left), parse_and()));
    }
    return left;
  }

  ExprPtr parse_and() {
    int line = cur().line;
    ExprPtr left = parse_not();
    while (is_name("and")) {
      next();
      left = mk(EK::And, line, kids(std::move(left), parse_not()));
    }
    return left;
  }

  ExprPtr parse_not() {
    if (is_name("not")) {
      Guard g(this);
      int line = cur().line;
      next();
      return mk(EK::Not, line, kids(parse_not()));
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    int line = cur().line;
    ExprPtr expr = parse_math1();
    std::vector<ExprPtr> operands;
    std::vector<std::string> ops;
    for (;;) {
      if (cur().type == Tok::Op && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                    cur().text == ">" || cur().text == "<=" || cur().text == ">=")) {
        ops.push_back(cur().text);
        next();
      } else if (is_name("in")) {
        ops.push_back("in");
        next();
      } else if (is_name("not") && peek().type == Tok::Name && peek().text == "in") {
        ops.push_back("notin");
        next();
        next();
      } else {
        break;
      }
      operands.push_back(parse_math1());
    }
    if (ops.empty()) return expr;
    operands.insert(operands.begin(), std::move(expr));
    auto e = mk(EK::Compare, line, std::move(operands));
    e->ops = std::move(ops);
    return e;
  }

  ExprPtr binary(const std::string& op, int line, ExprPtr l, ExprPtr r) {
    auto e = mk(EK::Binary, line, kids(std::move(l), std::move(r)));
    e->name = op;
    return e;
  }

  ExprPtr parse_math1() {
    int line = cur().line;
    ExprPtr left = parse_concat();
    while (is_op("+") || is_op("-")) {
      std::string op = cur().text;
      next();
      left = binary(op, line, std::move(left), parse_concat());
    }
    return left;
  }

  ExprPtr parse_concat() {
    int line = cur().line;
    std::vector<ExprPtr> args;
    args.push_back(parse_math2());
    while (is_op("~")) {
      next();
      args.push_back(parse_math2());
    }
    if (args.size() == 1) return std::move(args[0]);
    return mk(EK::Concat, line, std::move(args));
  }

  ExprPtr parse_math2() {
    int line = cur().line;
    ExprPtr left = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      std::string op = cur().text;
      next();
      left = binary(op, line, std::move(left), parse_pow());
    }
    return left;
  }

  ExprPtr parse_pow() {
    int line = cur().line;
    ExprPtr left = parse_unary(true);
    while (is_op("**")) {
      next();
      left = binary("**", line, std::move(left), parse_unary(true));
    }
    return left;
  }

  ExprPtr parse_unary(bool with_filter) {
    Guard g(this);
    int line = cur().line;
    ExprPtr node;
    if (is_op("-")) {
      next();
      node = mk(EK::Neg, line, kids(parse_unary(false)));
    } else if (is_op("+")) {
      next();
      node = mk(EK::Pos, line, kids(parse_unary(false)));
    } else {
      node = parse_primary();
    }
    node = parse_postfix(std::move(node));
    if (with_filter) node = parse_filter_expr(std::move(node));
    return node;
  }

  ExprPtr constant(Value v, int line) {
    auto e = mk(EK::Const, line);
    e->value = std::move(v);
    return e;
  }

  ExprPtr parse_primary() {
    Guard g(this);
    const Token& tk = cur();
    int line = tk.line;
    switch (tk.type) {
      case Tok::Name: {
        std::string n = tk.text;
        next();
        if (n == "true" || n == "True") return constant(Value::boolean(true), line);
        if (n == "false" || n == "False") return constant(Value::boolean(false), line);
        if (n == "none" || n == "None") return constant(Value::none(), line);
        for (Stmt* m : macro_stack_) {
          if (n == "caller") m->uses_caller = true;
          if (n == "varargs") m->uses_varargs = true;
          if (n == "kwargs") m->uses_kwargs = true;
        }
        auto e = mk(EK::Name, line);
        e->name = std::move(n);
        return e;
      }
      case Tok::String: {
        std::string s;
        while (cur().type == Tok::String) {
          s += cur().text;
          next();
        }
        return constant(Value::string(std::move(s)), line);
      }
      case Tok::Int: {
        int64_t v = tk.ival;
        next();
        return constant(Value::integer(v), line);
      }
      case Tok::Float: {
        double v = tk.fval;
        next();
        return constant(Value::number(v), line);
      }
      case Tok::Op:
        if (tk.text == "(") {
          next();
          ExprPtr e = parse_tuple(false, true, {}, true);
          expect_op(")");
          return e;
        }
        if (tk.text == "[") return parse_list();
        if (tk.text == "{") return parse_dict();
        break;
      default:
        break;
    }
    error("unexpected '" + describe(tk) + "'");
  }

  ExprPtr parse_list() {
    int line = cur().line;
    expect_op("[");
    std::vector<ExprPtr> items;
    while (!is_op("]")) {
      if (!items.empty()) expect_op(",");
      if (is_op("]")) break;
      items.push_back(parse_expression(true));
    }
    expect_op("]");
    return mk(EK::List, line, std::move(items));
  }

  ExprPtr parse_dict() {
    int line = cur().line;
    expect_op("{");
    std::vector<ExprPtr> items;
    while (!is_op("}")) {
      if (!items.empty()) expect_op(",");
      if (is_op("}")) break;
      items.push_back(parse_expression(true));
      expect_op(":");
      items.push_back(parse_expression(true));
    }
    expect_op("}");
    return mk(EK::Dict, line, std::move(items));
  }

  ExprPtr parse_postfix(ExprPtr node) {
    for (;;) {
      if (is_op(".") || is_op("[")) {
        node = parse_subscript(std::move(node));
      } else if (is_op("(")) {
        node = parse_call(std::move(node));
      } else {
        return node;
      }
    }
  }

  ExprPtr parse_filter_expr(ExprPtr node) {
    for (;;) {
      if (is_op("|")) {
        node = parse_filter(std::move(node), false);
      } else if (is_name("is")) {
        node = parse_test(std::move(node));
      } else if (is_op("(")) {
        node = parse_call(std::move(node));
      } else {
        return node;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr node) {
    int line = cur().line;
    if (is_op(".")) {
      next();
      if (cur().type == Tok::Name) {
        auto e = mk(EK::GetAttr, line, kids(std::move(node)));
        e->name = cur().text;
        next();
        return e;
      }
      if (cur().type == Tok::Int) {
        ExprPtr idx = constant(Value::integer(cur().ival), line);
        next();
        return mk(EK::GetItem, line, kids(std::move(node), std::move(idx)));
      }
      error("expected name or number");
    }
    expect_op("[");
    std::vector<ExprPtr> args;
    while (!is_op("]")) {
      if (!args.empty()) expect_op(",");
      args.push_back(parse_subscribed());
    }
    expect_op("]");
    if (args.empty()) error("expected subscript expression");
    if (args.size() == 1 && args[0]->k == EK::Slice) {
      args[0]->kids[0] = std::move(node);
      finish(*args[0]);
      return std::move(args[0]);
    }
    for (const auto& a : args)
      if (a->k == EK::Slice) error("slices inside tuple subscripts are not supported");
    ExprPtr index = args.size() == 1 ? std::move(args[0]) : mk(EK::Tuple, line, std::move(args));
    return mk(EK::GetItem, line, kids(std::move(node), std::move(index)));
  }

  ExprPtr parse_subscribed() {
    int line = cur().line;
    std::vector<ExprPtr> parts;
    parts.push_back(nullptr);  // the sliced object, filled in by parse_subscript
    if (is_op(":")) {
      next();
      parts.push_back(nullptr);
    } else {
      ExprPtr node = parse_expression(true);
      if (!is_op(":")) return node;
      next();
      parts.push_back(std::move(node));
    }
    if (is_op(":") || is_op("]") || is_op(",")) {
      parts.push_back(nullptr);
    } else {
      parts.push_back(parse_expression(true));
    }
    if (is_op(":")) {
      next();
      parts.push_back(is_op("]") || is_op(",") ? nullptr : parse_expression(true));
    } else {
      parts.push_back(nullptr);
    }
    return mk(EK::Slice, line, std::move(parts));
  }

  // (args, name=value, *seq, **mapping); *seq/**mapping are kept as kwargs named "*"/"**".
  void parse_call_args(Expr& e) {
    expect_op("(");
    bool require_comma = false, dyn_args = false, dyn_kwargs = false;
    while (!is_op(")")) {
      if (require_comma) {
        expect_op(",");
        if (is_op(")")) break;
      }
      if (is_op("*")) {
        if (dyn_args || dyn_kwargs) error("invalid syntax for function call expression");
        next();
        e.kwargs.emplace_back("*", parse_expression(true));
        dyn_args = true;
      } else if (is_op("**")) {
        if (dyn_kwargs) error("invalid syntax for function call expression");
        next();
        e.kwargs.emplace_back("**", parse_expression(true));
        dyn_kwargs = true;
      } else if (cur().type == Tok::Name && peek().type == Tok::Op && peek().text == "=") {
        if (dyn_kwargs) error("invalid syntax for function call expression");
        std::string key = cur().text;
        next();
        next();
        e.kwargs.emplace_back(std::move(key), parse_expression(true));
      } else {
        if (dyn_args || dyn_kwargs || !e.kwargs.empty()) error("invalid syntax for function call expression");
        e.kids.push_back(parse_expression(true));
      }
      require_comma = true;
    }
    next();
    finish(e);
  }

  ExprPtr parse_call(ExprPtr node) {
    auto e = mk(EK::Call, cur().line, kids(std::move(node)));
    parse_call_args(*e);
    return e;
  }

  ExprPtr parse_filter(ExprPtr node, bool start_inline) {
    while (is_op("|") || start_inline) {
      if (!start_inline) next();
      start_inline = false;
      int line = cur().line;
      std::string name = expect_name();
      while (is_op(".")) {
        next();
        name += '.';
        name += expect_name();
      }
      FilterFn fn = find_filter(name);
      if (!fn) error("No filter named '" + name + "'.");
      std::vector<ExprPtr> k;
      k.push_back(std::move(node));
      auto e = mk(EK::Filter, line, std::move(k));
      e->name = name;
      e->filter = fn;
      if (is_op("(")) parse_call_args(*e);
      node = std::move(e);
    }
    return node;
  }

  ExprPtr parse_test(ExprPtr node) {
    int line = cur().line;
    next();  // 'is'
    bool negated = false;
    if (is_name("not")) {
      next();
      negated = true;
    }
    std::string name = expect_name();
    while (is_op(".")) {
      next();
      name += '.';
      name += expect_name();
    }
    TestFn fn = find_test(name);
    if (!fn) error("No test named '" + name + "'.");
    auto e = mk(EK::Test, line, kids(std::move(node)));
    e->name = name;
    e->test = fn;
    const Token& c = cur();
    if (is_op("(")) {
      parse_call_args(*e);
    } else if ((c.type == Tok::Name || c.type == Tok::String || c.type == Tok::Int || c.type == Tok::Float ||
                is_op("[") || is_op("{")) &&
               !is_name("else") && !is_name("or") && !is_name("and")) {
      if (is_name("is")) error("You cannot chain multiple tests with is");
      e->kids.push_back(parse_postfix(parse_primary()));
      finish(*e);
    }
    if (negated) return mk(EK::Not, line, kids(std::move(e)));
    return e;
  }
};

}  // namespace

std::unique_ptr<Program> parse_program(const std::string& source) { return Parser(tokenize(source)).run(); }

}  // namespace larder::jinja
