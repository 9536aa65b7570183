#include "chat/jinja/interpreter.h"

#include <algorithm>
#include <cmath>

#include "chat/jinja/parser.h"
#include "chat/jinja/pystr.h"
#include "chat/jinja/stack.h"

namespace larder::jinja {
namespace {

// Native stack a render may use beyond its entry frame. Expression, block and macro nesting
// are all bounded separately; this catches their product (deep blocks in deep recursion).
constexpr size_t kStackBudget = 2u << 20;

struct DepthGuard {
  int& d;
  explicit DepthGuard(int& depth) : d(depth) { ++d; }
  ~DepthGuard() { --d; }
};

[[noreturn]] void bad_operands(const char* op, const Value& a, const Value& b) {
  fail(std::string("unsupported operand type(s) for ") + op + ": '" + type_name(a) + "' and '" + type_name(b) + "'");
}

int64_t add_i(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) fail("integer overflow");
  return r;
}
int64_t sub_i(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_sub_overflow(a, b, &r)) fail("integer overflow");
  return r;
}
int64_t mul_i(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) fail("integer overflow");
  return r;
}

// Python's float divmod (floor division and modulo with the sign of the divisor).
void float_divmod(double vx, double wx, double& floordiv, double& mod) {
  if (wx == 0.0) fail("float division by zero");
  mod = std::fmod(vx, wx);
  double div = (vx - mod) / wx;
  if (mod != 0.0) {
    if ((wx < 0) != (mod < 0)) {
      mod += wx;
      div -= 1.0;
    }
  } else {
    mod = std::copysign(0.0, wx);
  }
  if (div != 0.0) {
    floordiv = std::floor(div);
    if (div - floordiv > 0.5) floordiv += 1.0;
  } else {
    floordiv = std::copysign(0.0, vx / wx);
  }
}

Value repeat(Interp& in, const Value& seq, int64_t n) {
  if (n < 0) n = 0;
  if (seq.is_string()) {
    const std::string& s = seq.str();
    if (!s.empty() && static_cast<uint64_t>(n) > in.opts().max_output_bytes / s.size() + 1) in.check_string(SIZE_MAX);
    in.check_string(s.size() * static_cast<size_t>(n));
    std::string out;
    out.reserve(s.size() * static_cast<size_t>(n));
    for (int64_t k = 0; k < n; ++k) out += s;
    return seq.is_markup() ? Value::markup(std::move(out)) : Value::string(std::move(out));
  }
  const auto& items = seq.list().items;
  if (!items.empty() && static_cast<uint64_t>(n) > in.opts().max_list_items / items.size() + 1) in.check_list(SIZE_MAX);
  in.check_list(items.size() * static_cast<size_t>(n));
  std::vector<Value> out;
  for (int64_t k = 0; k < n; ++k) out.insert(out.end(), items.begin(), items.end());
  return Value::list(std::move(out), seq.list().tuple);
}

bool is_plain_seq(const Value& v) { return v.is_list() && !v.list().generator; }

}  // namespace

Interp::Interp(const RenderOptions& opts) : opts_(opts) {}

Interp::~Interp() {
  // Namespaces and scopes captured by macros are the only objects that can sit in a reference
  // cycle; emptying them lets every shared_ptr reach zero.
  for (auto& w : namespaces_) {
    if (auto n = w.lock()) {
      auto attrs = std::move(n->attrs);
      n->attrs.clear();
    }
  }
  for (auto& s : pinned_) {
    auto vars = std::move(s->vars);
    s->vars.clear();
  }
  pinned_.clear();
}

std::string Interp::render(const Program& prog, const Value& context) {
  stack_base_ = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
  stack_floor_ = stack_floor();
  auto globals = std::make_shared<Scope>();
  install_globals(*globals);
  auto ctx = std::make_shared<Scope>();
  ctx->parent = globals;
  if (context.is_dict())
    for (const auto& [k, v] : context.dict().items) ctx->vars[to_str(k)] = v;
  auto root = std::make_shared<Scope>();
  root->parent = ctx;
  std::string out;
  exec(prog.root, root, out);
  return out;
}

void Interp::check_stack() {
  uintptr_t here = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
  uintptr_t used = stack_base_ > here ? stack_base_ - here : here - stack_base_;
  if (used > kStackBudget || here < stack_floor_) fail("template nesting too deep");
}

void Interp::append(std::string& out, const std::string& text) {
  if (out.size() + text.size() > opts_.max_output_bytes)
    fail("template output exceeds the limit of " + std::to_string(opts_.max_output_bytes) + " bytes");
  tick(text.size() / 16);  // output a macro or set-block discards still costs time
  out += text;
}

Interp::Flow Interp::exec(const Body& body, const std::shared_ptr<Scope>& s, std::string& out) {
  for (const auto& st : body) {
    Flow f = exec_stmt(*st, s, out);
    if (f != Flow::Normal) return f;
  }
  return Flow::Normal;
}

Interp::Flow Interp::exec_stmt(const Stmt& st, const std::shared_ptr<Scope>& s, std::string& out) {
  tick();
  check_stack();
  line_ = st.line;
  switch (st.k) {
    case SK::Text:
      append(out, st.text);
      break;
    case SK::Output: {
      Value v = eval(*st.exprs[0], *s);
      if (v.is_string()) {
        append(out, v.str());
      } else {
        append(out, to_str(v));
      }
      break;
    }
    case SK::If:
      for (size_t k = 0; k < st.exprs.size(); ++k)
        if (truthy(eval(*st.exprs[k], *s))) return exec(st.bodies[k], s, out);
      if (st.bodies.size() > st.exprs.size()) return exec(st.bodies.back(), s, out);
      break;
    case SK::For:
      exec_for(st, s, out);
      break;
    case SK::Set:
      assign(*st.exprs[0], eval(*st.exprs[1], *s), *s);
      break;
    case SK::SetBlock: {  // the body runs in an inner scope: its own sets stay inside
      std::string buf;
      auto inner = std::make_shared<Scope>();
      inner->parent = s;
      Flow f = exec(st.bodies[0], inner, buf);
      if (f != Flow::Normal) return f;
      Value v = Value::string(std::move(buf));
      if (st.exprs[1]) v = apply_filter_chain(*st.exprs[1], v, *s);
      assign(*st.exprs[0], v, *s);
      break;
    }
    case SK::Macro:
      s->vars[st.name] = make_macro(st, s, st.name);
      break;
    case SK::CallBlock: {
      const Expr& call_expr = *st.exprs[0];
      Value callee = eval(*call_expr.kids[0], *s);
      CallArgs args;
      eval_args(call_expr, 1, *s, args);
      args.kw.emplace_back("caller", make_macro(st, s, "caller"));
      Value r = call(callee, args);
      append(out, to_str(r));
      break;
    }
    case SK::FilterBlock: {
      std::string buf;
      auto inner = std::make_shared<Scope>();
      inner->parent = s;
      Flow f = exec(st.bodies[0], inner, buf);
      if (f != Flow::Normal) return f;
      append(out, to_str(apply_filter_chain(*st.exprs[0], Value::string(std::move(buf)), *s)));
      break;
    }
    case SK::With: {
      std::vector<Value> vals;
      for (size_t k = 1; k < st.exprs.size(); k += 2) vals.push_back(eval(*st.exprs[k], *s));
      auto child = std::make_shared<Scope>();
      child->parent = s;
      for (size_t k = 0; k < vals.size(); ++k) assign(*st.exprs[2 * k], vals[k], *child);
      return exec(st.bodies[0], child, out);
    }
    case SK::Scope: {
      auto child = std::make_shared<Scope>();
      child->parent = s;
      exec(st.bodies[0], child, out);
      break;
    }
    case SK::Break:
      return Flow::Break;
    case SK::Continue:
      return Flow::Continue;
  }
  return Flow::Normal;
}

void Interp::exec_for(const Stmt& st, const std::shared_ptr<Scope>& s, std::string& out) {
  const Expr& target = *st.exprs[0];
  auto items = std::make_shared<ListObj>();
  items->items = iter(eval(*st.exprs[1], *s));
  if (st.exprs[2]) {  // `for x in seq if cond`: filtered before loop.index/length are counted
    std::vector<Value> kept;
    for (auto& it : items->items) {
      tick();
      Scope tmp;
      tmp.parent = s;
      assign(target, it, tmp);
      if (truthy(eval(*st.exprs[2], tmp))) kept.push_back(std::move(it));
    }
    items->items = std::move(kept);
  }
  int d = 0;
  for (const auto& it : items->items) d = std::max(d, it.depth());
  items->depth = d + 1;
  auto loop = std::make_shared<LoopObj>();
  loop->length = static_cast<int64_t>(items->items.size());
  loop->items = items;
  Value loop_val = Value::loop(loop);
  size_t n = items->items.size();
  // jinja2 clears its "else" flag at the end of the loop body, so the else block also runs when
  // every iteration left the body early through break/continue.
  bool completed = false;
  for (size_t k = 0; k < n; ++k) {
    tick();
    loop->index0 = static_cast<int64_t>(k);
    auto it_scope = std::make_shared<Scope>();  // fresh per iteration, as in jinja2
    it_scope->parent = s;
    it_scope->vars["loop"] = loop_val;
    assign(target, items->items[k], *it_scope);
    Flow f = exec(st.bodies[0], it_scope, out);
    if (f == Flow::Break) break;
    if (f == Flow::Normal) completed = true;
  }
  if (!completed && !st.bodies[1].empty()) {
    auto es = std::make_shared<Scope>();
    es->parent = s;
    exec(st.bodies[1], es, out);
  }
}

void Interp::assign(const Expr& target, const Value& v, Scope& s) {
  switch (target.k) {
    case EK::Name:
      s.vars[target.name] = v;
      return;
    case EK::Tuple: {
      if (!(v.is_list() || v.is_dict() || v.is_string() || v.is_undefined()))
        fail(std::string("cannot unpack non-iterable ") + type_name(v) + " object");
      std::vector<Value> items = iter(v);
      size_t n = target.kids.size();
      if (items.size() > n) fail("too many values to unpack (expected " + std::to_string(n) + ")");
      if (items.size() < n)
        fail("not enough values to unpack (expected " + std::to_string(n) + ", got " + std::to_string(items.size()) +
             ")");
      for (size_t k = 0; k < n; ++k) assign(*target.kids[k], items[k], s);
      return;
    }
    case EK::NSRef: {
      const Value* ns = s.find(target.name);
      if (!ns || ns->kind() != Kind::Namespace) fail("cannot assign attribute on non-namespace object");
      ns->ns().set(target.value.str(), v);
      return;
    }
    default:
      fail("invalid assignment target");
  }
}

Value Interp::make_macro(const Stmt& st, const std::shared_ptr<Scope>& s, const std::string& name) {
  auto c = std::make_shared<CallableObj>();
  c->type = CallableObj::Type::Macro;
  c->name = name;
  c->macro = &st;
  c->closure = s;
  if (pinned_.empty() || pinned_.back() != s) pinned_.push_back(s);
  return Value::callable(std::move(c));
}

Value Interp::call_macro(const CallableObj& m, CallArgs& args) {
  const Stmt& st = *m.macro;
  if (call_depth_ >= opts_.max_call_depth)
    fail("maximum macro recursion depth (" + std::to_string(opts_.max_call_depth) + ") exceeded");
  auto scope = std::make_shared<Scope>();
  scope->parent = m.closure;
  size_t np = st.params.size();
  std::vector<bool> bound(np, false);
  std::vector<Value> extra;
  for (size_t k = 0; k < args.pos.size(); ++k) {
    if (k < np) {
      scope->vars[st.params[k]] = args.pos[k];
      bound[k] = true;
    } else {
      extra.push_back(args.pos[k]);
    }
  }
  if (!extra.empty() && !st.uses_varargs)
    fail("macro '" + m.name + "' takes not more than " + std::to_string(np) + " argument(s)");
  auto kwdict = std::make_shared<DictObj>();
  Value caller;
  for (auto& [k, v] : args.kw) {
    auto it = std::find(st.params.begin(), st.params.end(), k);
    if (it != st.params.end()) {
      size_t idx = static_cast<size_t>(it - st.params.begin());
      if (bound[idx]) fail("macro '" + m.name + "' got multiple values for argument '" + k + "'");
      scope->vars[k] = v;
      bound[idx] = true;
    } else if (k == "caller" && st.uses_caller) {
      caller = v;
    } else if (st.uses_kwargs) {
      kwdict->set(Value::string(k), v);
    } else {
      fail("macro '" + m.name + "' takes no keyword argument '" + k + "'");
    }
  }
  // Defaults are evaluated in the macro's scope, so `b=a` sees the parameter a.
  for (size_t k = 0; k < np; ++k) {
    if (bound[k]) continue;
    if (st.defaults[k]) {
      scope->vars[st.params[k]] = eval(*st.defaults[k], *scope);
    } else {
      scope->vars[st.params[k]] = Value::undefined("'" + st.params[k] + "' is undefined");
    }
  }
  if (st.uses_varargs) scope->vars["varargs"] = Value::list(std::move(extra), true);
  if (st.uses_kwargs) scope->vars["kwargs"] = Value::dict(std::move(kwdict));
  if (st.uses_caller && !scope->vars.count("caller")) scope->vars["caller"] = caller;
  std::string out;
  DepthGuard g(call_depth_);
  exec(st.bodies[0], scope, out);
  return Value::string(std::move(out));
}

Value Interp::call(const Value& callee, CallArgs& args) {
  if (callee.is_undefined()) fail_undefined(callee);
  if (callee.kind() != Kind::Callable) fail(std::string("'") + type_name(callee) + "' object is not callable");
  const CallableObj& c = callee.fn();
  switch (c.type) {
    case CallableObj::Type::Builtin:
      return c.builtin(*this, args);
    case CallableObj::Type::Macro:
      return call_macro(c, args);
    case CallableObj::Type::Method:
      return call_method(*this, c, args);
  }
  return Value();
}

Value Interp::make_namespace(CallArgs& args) {
  auto n = std::make_shared<NamespaceObj>();
  for (const Value& p : args.pos) {
    if (p.is_dict()) {
      for (const auto& [k, v] : p.dict().items) n->set(to_str(k), v);
    } else if (p.is_list()) {
      for (const Value& pair : p.list().items) {
        if (!pair.is_list() || pair.list().items.size() != 2) fail("namespace() needs a mapping or key/value pairs");
        n->set(to_str(pair.list().items[0]), pair.list().items[1]);
      }
    } else {
      fail(std::string("'") + type_name(p) + "' object is not iterable");
    }
  }
  for (auto& [k, v] : args.kw) n->set(k, v);
  namespaces_.push_back(n);
  return Value::ns(std::move(n));
}

bool Interp::run_test(const std::string& name, const Value& v, CallArgs& args) {
  TestFn fn = find_test(name);
  if (!fn) fail("No test named '" + name + "'.");
  return fn(*this, v, args);
}

Value Interp::run_filter(const std::string& name, const Value& v, CallArgs& args) {
  FilterFn fn = find_filter(name);
  if (!fn) fail("No filter named '" + name + "'.");
  return fn(*this, v, args);
}

Value Interp::apply_filter_chain(const Expr& chain, const Value& input, Scope& s) {
  const Value* saved = block_input_;
  block_input_ = &input;
  Value r = eval(chain, s);
  block_input_ = saved;
  return r;
}

void Interp::eval_args(const Expr& e, size_t first, Scope& s, CallArgs& out) {
  for (size_t k = first; k < e.kids.size(); ++k) out.pos.push_back(eval(*e.kids[k], s));
  for (const auto& [name, x] : e.kwargs) {
    Value v = eval(*x, s);
    if (name == "*") {
      for (auto& it : iter(v)) out.pos.push_back(std::move(it));
    } else if (name == "**") {
      if (!v.is_dict()) fail("argument after ** must be a mapping");
      for (const auto& [k, val] : v.dict().items) {
        if (!k.is_string()) fail("keywords must be strings");
        out.kw.emplace_back(k.str(), val);
      }
    } else {
      out.kw.emplace_back(name, std::move(v));
    }
  }
}

Value Interp::eval(const Expr& e, Scope& s) {
  tick();
  check_stack();
  line_ = e.line;
  switch (e.k) {
    case EK::Const:
      return e.value;
    case EK::Name: {
      const Value* v = s.find(e.name);
      if (v) return *v;
      return Value::undefined("'" + e.name + "' is undefined");
    }
    case EK::List:
    case EK::Tuple: {
      std::vector<Value> items;
      items.reserve(e.kids.size());
      for (const auto& k : e.kids) items.push_back(eval(*k, s));
      return Value::list(std::move(items), e.k == EK::Tuple);
    }
    case EK::Dict: {
      auto d = std::make_shared<DictObj>();
      for (size_t k = 0; k + 1 < e.kids.size(); k += 2) {
        Value key = eval(*e.kids[k], s);
        d->set(std::move(key), eval(*e.kids[k + 1], s));
      }
      return Value::dict(std::move(d));
    }
    case EK::GetAttr:
      return get_attr(*this, eval(*e.kids[0], s), e.name);
    case EK::GetItem: {
      Value obj = eval(*e.kids[0], s);
      return get_item(*this, obj, eval(*e.kids[1], s));
    }
    case EK::Slice: {
      Value obj = eval(*e.kids[0], s);
      Value parts[3];
      for (int k = 0; k < 3; ++k) parts[k] = e.kids[k + 1] ? eval(*e.kids[k + 1], s) : Value::none();
      return get_slice(*this, obj, parts[0], parts[1], parts[2]);
    }
    case EK::Call: {
      Value callee = eval(*e.kids[0], s);
      CallArgs args;
      eval_args(e, 1, s, args);
      return call(callee, args);
    }
    case EK::Filter: {
      Value input = e.kids[0] ? eval(*e.kids[0], s) : (block_input_ ? *block_input_ : Value());
      CallArgs args;
      eval_args(e, 1, s, args);
      line_ = e.line;
      if (input.is_string()) tick(input.str().size() / 16);  // string filters are linear in their input
      return e.filter(*this, input, args);
    }
    case EK::Test: {
      Value v = eval(*e.kids[0], s);
      CallArgs args;
      eval_args(e, 1, s, args);
      line_ = e.line;
      return Value::boolean(e.test(*this, v, args));
    }
    case EK::Neg:
    case EK::Pos: {
      Value v = eval(*e.kids[0], s);
      const char* op = e.k == EK::Neg ? "-" : "+";
      if (v.is_undefined()) fail_undefined(v);
      if (v.is_int_like()) {
        if (e.k == EK::Pos) return Value::integer(v.i());
        if (v.i() == INT64_MIN) fail("integer overflow");
        return Value::integer(-v.i());
      }
      if (v.kind() == Kind::Float) return Value::number(e.k == EK::Neg ? -v.f() : v.f());
      fail(std::string("bad operand type for unary ") + op + ": '" + type_name(v) + "'");
    }
    case EK::Not:
      return Value::boolean(!truthy(eval(*e.kids[0], s)));
    case EK::And: {
      Value a = eval(*e.kids[0], s);
      if (!truthy(a)) return a;
      return eval(*e.kids[1], s);
    }
    case EK::Or: {
      Value a = eval(*e.kids[0], s);
      if (truthy(a)) return a;
      return eval(*e.kids[1], s);
    }
    case EK::Binary: {
      Value a = eval(*e.kids[0], s);
      Value b = eval(*e.kids[1], s);
      line_ = e.line;
      return eval_binary(e.name, a, b);
    }
    case EK::Concat: {
      std::string r;
      for (const auto& k : e.kids) {
        Value v = eval(*k, s);
        if (v.is_string()) {
          r += v.str();
        } else {
          r += to_str(v);
        }
        check_string(r.size());
      }
      return Value::string(std::move(r));
    }
    case EK::Compare: {
      Value left = eval(*e.kids[0], s);
      for (size_t k = 0; k < e.ops.size(); ++k) {
        Value right = eval(*e.kids[k + 1], s);
        line_ = e.line;
        if (!eval_compare(e.ops[k], left, right)) return Value::boolean(false);
        left = std::move(right);
      }
      return Value::boolean(true);
    }
    case EK::CondExpr:
      if (truthy(eval(*e.kids[0], s))) return eval(*e.kids[1], s);
      if (e.kids[2]) return eval(*e.kids[2], s);
      return Value::undefined("the inline if-expression evaluated to false and no else section was defined.");
    case EK::NSRef:
      fail("namespace reference used as a value");
  }
  return Value();
}

bool Interp::eval_compare(const std::string& op, const Value& a, const Value& b) {
  if (op == "==") return equals(a, b);
  if (op == "!=") return !equals(a, b);
  if (op == "in" || op == "notin") {
    if (b.is_string()) tick(b.str().size() / 16);
    bool r = contains(b, a);
    return op == "in" ? r : !r;
  }
  int c = compare(a, b);
  if (op == "<") return c < 0;
  if (op == "<=") return c <= 0;
  if (op == ">") return c > 0;
  return c >= 0;
}

bool contains(const Value& seq, const Value& item) {
  switch (seq.kind()) {
    case Kind::String:
      if (!item.is_string()) fail(std::string("'in <string>' requires string as left operand, not ") + type_name(item));
      return seq.str().find(item.str()) != std::string::npos;
    case Kind::List:
      for (const auto& v : seq.list().items)
        if (equals(v, item)) return true;
      return false;
    case Kind::Dict: {
      if (!hash_key(item)) fail(std::string("unhashable type: '") + type_name(item) + "'");
      return seq.dict().find(item) != nullptr;
    }
    case Kind::Undefined:
    case Kind::Loop:
      return false;
    default:
      fail(std::string("argument of type '") + type_name(seq) + "' is not iterable");
  }
}

Value Interp::eval_binary(const std::string& op, const Value& a, const Value& b) {
  if (a.is_undefined()) fail_undefined(a);
  if (b.is_undefined() && !(op == "%" && a.is_string())) fail_undefined(b);  // str % Undefined is allowed
  const char* o = op.c_str();
  bool nums = a.is_number() && b.is_number();
  bool ints = a.is_int_like() && b.is_int_like();
  if (op == "+") {
    if (ints) return Value::integer(add_i(a.i(), b.i()));
    if (nums) return Value::number(a.f() + b.f());
    if (a.is_string() && b.is_string()) {
      check_string(a.str().size() + b.str().size());
      if (a.is_markup() || b.is_markup()) {  // Markup.__add__/__radd__ escape the plain str
        std::string r =
            (a.is_markup() ? a.str() : html_escape(a.str())) + (b.is_markup() ? b.str() : html_escape(b.str()));
        check_string(r.size());
        return Value::markup(std::move(r));
      }
      return Value::string(a.str() + b.str());
    }
    if (is_plain_seq(a) && is_plain_seq(b) && a.list().tuple == b.list().tuple) {
      check_list(a.list().items.size() + b.list().items.size());
      std::vector<Value> items = a.list().items;
      items.insert(items.end(), b.list().items.begin(), b.list().items.end());
      return Value::list(std::move(items), a.list().tuple);
    }
    if (a.is_string()) fail(std::string("can only concatenate str (not \"") + type_name(b) + "\") to str");
    if (is_plain_seq(a) && !a.list().tuple)
      fail(std::string("can only concatenate list (not \"") + type_name(b) + "\") to list");
    bad_operands(o, a, b);
  }
  if (op == "-") {
    if (ints) return Value::integer(sub_i(a.i(), b.i()));
    if (nums) return Value::number(a.f() - b.f());
    bad_operands(o, a, b);
  }
  if (op == "*") {
    if (ints) return Value::integer(mul_i(a.i(), b.i()));
    if (nums) return Value::number(a.f() * b.f());
    if ((a.is_string() || is_plain_seq(a)) && b.is_int_like()) return repeat(*this, a, b.i());
    if ((b.is_string() || is_plain_seq(b)) && a.is_int_like()) return repeat(*this, b, a.i());
    if (a.is_string() || b.is_string() || a.is_list() || b.is_list())
      fail(std::string("can't multiply sequence by non-int of type '") + type_name(a.is_number() ? a : b) + "'");
    bad_operands(o, a, b);
  }
  if (op == "/") {
    if (!nums) bad_operands(o, a, b);
    if (b.f() == 0.0) fail("division by zero");
    return Value::number(a.f() / b.f());
  }
  if (op == "//" || op == "%") {
    if (op == "%" && a.is_string()) {
      if (a.is_markup()) {  // Markup.__mod__ escapes what it interpolates
        auto esc = [](const Value& v) {
          if (v.is_markup() || v.is_number() || v.is_none() || v.is_list() || v.is_dict() || v.is_undefined()) return v;
          return Value::markup(html_escape(to_str(v)));
        };
        Value args = b;
        if (b.is_list() && b.list().tuple) {
          std::vector<Value> items;
          for (const auto& v : b.list().items) items.push_back(esc(v));
          args = Value::list(std::move(items), true);
        } else if (!b.is_dict()) {
          args = esc(b);
        }
        std::string r = percent_format(a.str(), args);
        check_string(r.size());
        return Value::markup(std::move(r));
      }
      std::string r = percent_format(a.str(), b);
      check_string(r.size());
      return Value::string(std::move(r));
    }
    if (!nums) bad_operands(o, a, b);
    if (ints) {
      int64_t x = a.i(), y = b.i();
      if (y == 0) fail("integer division or modulo by zero");
      if (x == INT64_MIN && y == -1) {
        if (op == "%") return Value::integer(0);
        fail("integer overflow");
      }
      int64_t q = x / y, r = x % y;
      if (r != 0 && ((r < 0) != (y < 0))) {
        q -= 1;
        r += y;
      }
      return Value::integer(op == "//" ? q : r);
    }
    if (b.f() == 0.0) fail(op == "//" ? "float floor division by zero" : "float modulo");
    double fd, md;
    float_divmod(a.f(), b.f(), fd, md);
    return Value::number(op == "//" ? fd : md);
  }
  if (op == "**") {
    if (!nums) bad_operands("** or pow()", a, b);
    if (ints && b.i() >= 0) {
      int64_t base = a.i(), e = b.i(), r = 1;
      while (e > 0) {
        if (e & 1) r = mul_i(r, base);
        e >>= 1;
        if (e > 0) base = mul_i(base, base);
      }
      return Value::integer(r);
    }
    double x = a.f(), y = b.f();
    if (x == 0.0 && y < 0) fail("0.0 cannot be raised to a negative power");
    if (x < 0 && y != std::floor(y)) fail("complex results are not supported");
    double r = std::pow(x, y);
    if (std::isinf(r) && std::isfinite(x) && std::isfinite(y)) fail("numerical result out of range");
    return Value::number(r);
  }
  fail("unknown operator " + op);
}

// ---------------------------------------------------------------- public API

Result<Template> Template::parse(const std::string& source) {
  try {
    Template t;
    t.prog_ = parse_program(source);
    return t;
  } catch (const JinjaError& e) {
    return Error{"jinja: " + e.msg};
  } catch (const std::bad_alloc&) {
    return Error{"jinja: out of memory while parsing the template"};
  } catch (const std::exception& e) {
    return Error{std::string("jinja: internal error: ") + e.what()};
  }
}

Result<std::string> Template::render(const nlohmann::ordered_json& context, const RenderOptions& opts) const {
  if (!prog_) return Error{"jinja: template was not parsed"};
  if (!context.is_object() && !context.is_null()) return Error{"jinja: the render context must be a JSON object"};
  int line = 0;
  try {
    Value ctx = from_json(context.is_null() ? nlohmann::ordered_json::object() : context);
    Interp in(opts);
    try {
      return in.render(*prog_, ctx);
    } catch (...) {
      line = in.line();
      throw;
    }
  } catch (const JinjaError& e) {
    if (e.user) return Error{e.msg};
    return Error{"jinja: line " + std::to_string(line) + ": " + e.msg};
  } catch (const std::bad_alloc&) {
    return Error{"jinja: out of memory while rendering"};
  } catch (const std::exception& e) {
    return Error{std::string("jinja: internal error: ") + e.what()};
  }
}

}  // namespace larder::jinja
