// Syntax tree of a parsed template. Expressions and statements are generic nodes whose
// children live in `kids`; each node records its nesting depth so evaluation and destruction
// recursion stay bounded (the parser rejects deeper trees).
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "chat/jinja/value.h"

namespace larder::jinja {

class Interp;
struct CallArgs;
using FilterFn = Value (*)(Interp&, const Value&, CallArgs&);
using TestFn = bool (*)(Interp&, const Value&, CallArgs&);

constexpr int kMaxExprDepth = 200;
constexpr int kMaxBlockDepth = 100;

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

enum class EK {
  Const,    // value
  Name,     // name
  List,     // kids: items
  Tuple,    // kids: items
  Dict,     // kids: k0, v0, k1, v1, ...
  GetAttr,  // kids[0].name
  GetItem,  // kids[0][kids[1]]
  Slice,    // kids[0][kids[1]:kids[2]:kids[3]] (null kids for omitted parts)
  Call,     // kids[0](kids[1..], kwargs)
  Filter,   // kids[0] | name(kids[1..], kwargs); kids[0] null means the filter-block input
  Test,     // kids[0] is name(kids[1..], kwargs)
  Neg,
  Pos,
  Not,
  And,
  Or,
  Binary,    // kids[0] name kids[1] for + - * / // % **
  Concat,    // kids joined with ~
  Compare,   // kids[0] ops[0] kids[1] ops[1] kids[2] ...
  CondExpr,  // kids[1] if kids[0] else kids[2] (kids[2] may be null)
  NSRef,     // assignment target name.attr
};

struct Expr {
  EK k;
  int line = 0;
  int depth = 1;
  Value value;
  std::string name;
  std::vector<ExprPtr> kids;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  std::vector<std::string> ops;
  FilterFn filter = nullptr;
  TestFn test = nullptr;
};

struct Stmt;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

enum class SK {
  Text,         // text
  Output,       // exprs[0]
  If,           // exprs: conditions; bodies: one per condition, plus an else body
  For,          // exprs: target, iterable, filter (may be null); bodies: body, else
  Set,          // exprs: target, value
  SetBlock,     // exprs: target, filter chain (may be null); bodies[0]
  Macro,        // name, params, defaults; bodies[0]
  CallBlock,    // exprs[0]: the call; params/defaults/bodies[0]: the caller macro
  FilterBlock,  // exprs[0]: filter chain; bodies[0]
  With,         // exprs: target0, value0, target1, value1...; bodies[0]
  Scope,        // bodies[0] in a child scope ({% generation %})
  Break,
  Continue,
};

struct Stmt {
  SK k;
  int line = 0;
  std::string text;
  std::string name;
  std::vector<ExprPtr> exprs;
  std::vector<Body> bodies;
  std::vector<std::string> params;
  std::vector<ExprPtr> defaults;  // aligned with params; null where there is no default
  bool uses_caller = false, uses_varargs = false, uses_kwargs = false;
};

struct Program {
  Body root;
};

}  // namespace larder::jinja
