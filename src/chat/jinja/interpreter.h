// Tree-walking evaluator. Scopes follow jinja2: each for-loop iteration, macro call, call
// block and `with` gets a child scope; `set` writes the innermost scope; macros close over the
// scope they were defined in (late binding). Mutable objects that can form reference cycles
// (namespaces, scopes captured by macros) are tracked and cleared when the render ends.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "chat/jinja/ast.h"
#include "chat/jinja/builtins.h"
#include "chat/jinja/jinja.h"
#include "chat/jinja/value.h"

namespace larder::jinja {

// Scopes hold a handful of names; a flat vector is cheaper than hashing for them.
class VarMap {
 public:
  Value& operator[](const std::string& name) {
    for (auto& [n, v] : items_)
      if (n == name) return v;
    if (items_.empty()) items_.reserve(4);
    items_.emplace_back(name, Value());
    return items_.back().second;
  }
  const Value* find(const std::string& name) const {
    for (const auto& [n, v] : items_)
      if (n == name) return &v;
    return nullptr;
  }
  size_t count(const std::string& name) const { return find(name) ? 1 : 0; }
  void clear() { items_.clear(); }

 private:
  std::vector<std::pair<std::string, Value>> items_;
};

struct Scope {
  VarMap vars;
  std::shared_ptr<Scope> parent;
  const Value* find(const std::string& name) const {
    for (const Scope* s = this; s; s = s->parent.get())
      if (const Value* v = s->vars.find(name)) return v;
    return nullptr;
  }
};

using BuiltinFn = Value (*)(Interp&, CallArgs&);

struct CallableObj {
  enum class Type { Builtin, Macro, Method };
  Type type = Type::Builtin;
  std::string name;
  BuiltinFn builtin = nullptr;
  const Stmt* macro = nullptr;  // Macro or CallBlock node (its params and body)
  std::shared_ptr<Scope> closure;
  Value self;  // Method: the receiver
};

// Python's `item in seq`.
bool contains(const Value& seq, const Value& item);

class Interp {
 public:
  explicit Interp(const RenderOptions& opts);
  ~Interp();
  Interp(const Interp&) = delete;
  Interp& operator=(const Interp&) = delete;

  std::string render(const Program& prog, const Value& context);

  Value eval(const Expr& e, Scope& s);
  Value call(const Value& callee, CallArgs& args);
  Value make_namespace(CallArgs& args);
  bool run_test(const std::string& name, const Value& v, CallArgs& args);
  Value run_filter(const std::string& name, const Value& v, CallArgs& args);

  void check_stack();
  void tick(uint64_t n = 1) {
    steps_ += n;
    if (steps_ > opts_.max_steps) fail("template exceeded the evaluation step limit");
  }
  // Every string a template builds is charged to the step budget and bounded by the output limit.
  void check_string(size_t n) {
    if (n > opts_.max_output_bytes)
      fail("template output exceeds the limit of " + std::to_string(opts_.max_output_bytes) + " bytes");
    tick(n / 16);
  }
  void check_list(size_t n) {
    if (n > opts_.max_list_items) fail("list exceeds " + std::to_string(opts_.max_list_items) + " items");
    tick(n / 4);  // 32-byte values: the step budget also bounds what a template can allocate
  }
  // iterate() under the list-size limit, charged to the step budget.
  std::vector<Value> iter(const Value& v) {
    std::vector<Value> items = iterate(v, opts_.max_list_items);
    tick(items.size() / 4);
    return items;
  }
  const RenderOptions& opts() const { return opts_; }
  int line() const { return line_; }

 private:
  enum class Flow { Normal, Break, Continue };

  Flow exec(const Body& body, const std::shared_ptr<Scope>& s, std::string& out);
  Flow exec_stmt(const Stmt& st, const std::shared_ptr<Scope>& s, std::string& out);
  void exec_for(const Stmt& st, const std::shared_ptr<Scope>& s, std::string& out);
  void append(std::string& out, const std::string& text);
  void assign(const Expr& target, const Value& v, Scope& s);
  Value call_macro(const CallableObj& m, CallArgs& args);
  Value make_macro(const Stmt& st, const std::shared_ptr<Scope>& s, const std::string& name);
  Value eval_binary(const std::string& op, const Value& a, const Value& b);
  bool eval_compare(const std::string& op, const Value& a, const Value& b);
  Value apply_filter_chain(const Expr& chain, const Value& input, Scope& s);
  void eval_args(const Expr& e, size_t first, Scope& s, CallArgs& out);

  const RenderOptions& opts_;
  uintptr_t stack_base_ = 0;
  uintptr_t stack_floor_ = 0;
  uint64_t steps_ = 0;
  int call_depth_ = 0;
  int line_ = 0;
  const Value* block_input_ = nullptr;
  std::vector<std::weak_ptr<NamespaceObj>> namespaces_;
  std::vector<std::shared_ptr<Scope>> pinned_;
};

}  // namespace larder::jinja
