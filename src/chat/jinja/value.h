// Runtime values of the template language, with Python semantics where templates can observe
// them: str()/repr() formatting, ==, ordering, truthiness, json.dumps. Lists and dicts are
// immutable once built (the HF sandbox forbids mutating methods); only namespace() objects and
// loop contexts change, and those are owned by shared_ptr with cycles broken at render end.
#pragma once
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace larder::jinja {

// Thrown inside the jinja module only; Template::parse/render convert it to Result errors.
struct JinjaError {
  std::string msg;
  bool user = false;  // raised by the template itself (raise_exception): message kept verbatim
};
[[noreturn]] void fail(std::string msg);

// Container nesting deeper than this is rejected where it is built, so printing, comparing
// and destroying values never recurses unboundedly.
constexpr int kMaxValueDepth = 256;

struct ListObj;
struct DictObj;
struct NamespaceObj;
struct LoopObj;
struct CallableObj;

enum class Kind : uint8_t { Undefined, None, Bool, Int, Float, String, List, Dict, Namespace, Loop, Callable };

class Value {
 public:
  Value() = default;  // undefined without a hint
  static Value undefined(std::string hint);
  static Value none();
  static Value boolean(bool b);
  static Value integer(int64_t i);
  static Value number(double d);
  static Value string(std::string s);
  // markupsafe.Markup (from |safe, |escape): `+` with a plain str HTML-escapes the plain side.
  static Value markup(std::string s);
  static Value list(std::vector<Value> items, bool tuple = false, bool generator = false);
  static Value dict(std::shared_ptr<DictObj> d);
  static Value ns(std::shared_ptr<NamespaceObj> n);
  static Value loop(std::shared_ptr<LoopObj> l);
  static Value callable(std::shared_ptr<CallableObj> c);

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::Undefined; }
  bool is_none() const { return kind_ == Kind::None; }
  bool is_string() const { return kind_ == Kind::String; }
  bool is_markup() const { return kind_ == Kind::String && markup_; }
  bool is_list() const { return kind_ == Kind::List; }
  bool is_dict() const { return kind_ == Kind::Dict; }
  bool is_int_like() const { return kind_ == Kind::Int || kind_ == Kind::Bool; }
  bool is_number() const { return kind_ == Kind::Int || kind_ == Kind::Bool || kind_ == Kind::Float; }

  bool b() const { return b_; }
  int64_t i() const { return kind_ == Kind::Bool ? (b_ ? 1 : 0) : i_; }              // Bool or Int
  double f() const { return kind_ == Kind::Float ? f_ : static_cast<double>(i()); }  // any number
  const std::string& str() const { return *static_cast<const std::string*>(p_.get()); }
  const ListObj& list() const { return *static_cast<const ListObj*>(p_.get()); }
  const DictObj& dict() const { return *static_cast<const DictObj*>(p_.get()); }
  NamespaceObj& ns() const { return *static_cast<NamespaceObj*>(p_.get()); }
  LoopObj& loop() const { return *static_cast<LoopObj*>(p_.get()); }
  const CallableObj& fn() const { return *static_cast<const CallableObj*>(p_.get()); }
  std::shared_ptr<const ListObj> list_ptr() const { return std::static_pointer_cast<const ListObj>(p_); }
  const std::string& undefined_hint() const;
  const void* identity() const { return p_.get(); }
  int depth() const;  // container nesting (0 for scalars)

 private:
  Kind kind_ = Kind::Undefined;
  bool markup_ = false;
  union {
    bool b_;
    int64_t i_ = 0;
    double f_;
  };
  std::shared_ptr<void> p_;
};

struct ListObj {
  std::vector<Value> items;
  bool tuple = false;
  bool generator = false;  // a lazy Python iterator (map/select/items...): no len(), always truthy
  int depth = 1;
};

struct DictObj {
  std::vector<std::pair<Value, Value>> items;
  std::unordered_map<std::string, size_t> index;  // hash_key(key) -> position in items
  int depth = 1;
  const Value* find(const Value& key) const;
  const Value* find(const std::string& key) const;
  void set(Value key, Value v);  // construction only; throws for unhashable keys
};

struct NamespaceObj {
  std::vector<std::pair<std::string, Value>> attrs;
  int depth = 1;  // only grows: a conservative bound on what destroying it recurses through
  const Value* find(const std::string& name) const;
  void set(const std::string& name, Value v);  // throws when nesting would pass kMaxValueDepth
};

struct LoopObj {
  int64_t index0 = 0;
  int64_t length = 0;
  std::shared_ptr<const ListObj> items;  // for previtem/nextitem
};

// Python-visible type name, used in error messages ('int', 'str', 'dict', ...).
const char* type_name(const Value& v);

bool truthy(const Value& v);
std::string to_str(const Value& v);  // str(v); Undefined -> ""
void repr_into(std::string& out, const Value& v, int depth = 0);
std::string py_float_repr(double d);
std::string py_str_repr(const std::string& s);
std::string html_escape(const std::string& s);  // markupsafe.escape

bool equals(const Value& a, const Value& b, int depth = 0);
int compare(const Value& a, const Value& b, int depth = 0);  // Python <; throws on unorderable types
std::optional<std::string> hash_key(const Value& v, int depth = 0);

struct JsonOptions {
  std::string indent;  // used when has_indent
  bool has_indent = false;
  std::string item_sep = ", ";
  std::string key_sep = ": ";
  bool sort_keys = false;
  bool ensure_ascii = false;
};
// json.dumps semantics (what transformers' tojson filter calls).
std::string to_json(const Value& v, const JsonOptions& opts);
Value from_json(const nlohmann::ordered_json& j, int depth = 0);

// Elements that `for x in v` visits: list items, dict keys, string characters; Undefined is
// empty (as in jinja2). Other types throw Python's TypeError message, and so does a string
// with more than max_items characters (the engine's list-size limit).
std::vector<Value> iterate(const Value& v, size_t max_items = SIZE_MAX);
[[noreturn]] void fail_undefined(const Value& v);

}  // namespace larder::jinja
