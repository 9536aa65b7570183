// `larder quantize IN OUT TYPE [-t N]`: convert a GGUF model's weights (llama.cpp's recipes).
#include <chrono>
#include <cstdio>

#include "cli/commands.h"
#include "model/quantize.h"

namespace larder::cli {

int cmd_quantize(Args& a) {
  if (a.quant_args.size() != 3)
    return fail("usage: larder quantize IN OUT TYPE [-t N] (TYPE: " + quant_file_type_list() + ")");
  const std::string& in = a.quant_args[0];
  const std::string& out = a.quant_args[1];
  auto ft = parse_quant_file_type(a.quant_args[2]);
  if (!ft.ok()) return fail(ft.error());
  if (a.n_threads < 0) return fail("the thread count must be positive (0 = all cores)");
  if (in == out) return fail("the output must be a different file from the input");
  QuantizeOptions opt;
  opt.n_threads = a.n_threads;
  opt.log = [](const std::string& s) { std::fprintf(stderr, "%s\n", s.c_str()); };
  auto t0 = std::chrono::steady_clock::now();
  auto r = quantize_gguf(in, out, *ft, opt);
  if (!r.ok()) return fail(r.error());
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "larder: wrote %s (%s): %d tensors, %d converted, %.2f MiB -> %.2f MiB (%.2f bits/weight), %.1f s\n",
               out.c_str(), ft->name, r->n_tensors, r->n_converted, r->bytes_in / 1048576.0, r->bytes_out / 1048576.0,
               r->n_elements ? 8.0 * r->bytes_out / r->n_elements : 0.0, secs);
  if (r->n_fallback > 0)
    std::fprintf(stderr, "larder: %d tensor(s) used a fallback type because their rows do not divide into blocks\n",
                 r->n_fallback);
  return 0;
}

}  // namespace larder::cli
