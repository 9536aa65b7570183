// Prometheus text exposition (format 0.0.4) helpers shared by the server, the P/D handoff
// and the router.
#pragma once
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace larder::prom {

std::string fmt_double(double v);
// "# HELP name help" and "# TYPE name type" lines.
void header(std::string& out, const char* name, const char* type, const char* help);
// header() plus one unlabelled sample.
void scalar(std::string& out, const char* name, const char* type, const char* help, double v);
std::string escape_label(const std::string& s);

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double v);
  // Appends the _bucket/_sum/_count lines.
  void render(std::string& out, const std::string& name) const;

 private:
  mutable std::mutex mu_;
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket (not cumulative), + one for +Inf
  double sum_ = 0;
  uint64_t count_ = 0;
};

}  // namespace larder::prom
