// Shared between the layout writer and the runtime.
#pragma once
#include "model/model.h"
#include "offload/offload.h"

namespace larder::offload {
// The down column's type of layer l for a --down-type name ("auto": down's own where it fits).
DType layer_down_type(const Model& m, int l, const std::string& name);
// Types and sizes of layer l's records (offset not set).
LayerLayout layer_layout(const Model& m, int l, DType down_type);
// Layer l's n_ff records: [up row j][down column j re-quantized][zero pad].
void build_records(const Model& m, int l, const LayerLayout& ll, uint8_t* out, ThreadPool& pool);
// The FFN's activation of a gate pre-activation (SiLU, or GELU with the tanh approximation).
float activation(float g, bool gelu);
}  // namespace larder::offload
