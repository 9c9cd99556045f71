// One decode step's attention for many sessions in one call: row b's query against its own
// session's keys and values, wherever they lie (views of each session's slab, any strides but
// the last). A Python loop of one SDPA call per row costs more than the maths on a small model.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

// query [B, H, 1, D]; keys[b], values[b] [1, kv_heads, L_b, D]. Returns [B, 1, H, D], the
// layout transformers' attention functions return. window > 0: each row sees its last `window` keys.
torch::Tensor rows_attention(const torch::Tensor& query, const std::vector<torch::Tensor>& keys,
                             const std::vector<torch::Tensor>& values, double scale, int64_t window) {
  TORCH_CHECK(query.dim() == 4 && query.size(2) == 1, "query must be [B, heads, 1, head_dim]");
  TORCH_CHECK(query.device().is_cpu() && query.scalar_type() == torch::kFloat32, "float32 CPU tensors only");
  const int64_t B = query.size(0), H = query.size(1), D = query.size(3);
  TORCH_CHECK((int64_t)keys.size() == B && (int64_t)values.size() == B, "one key and one value tensor a row");
  for (int64_t b = 0; b < B; ++b) {
    const auto& k = keys[b];
    const auto& v = values[b];
    TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes() && k.size(3) == D, "row ", b, ": keys/values must be [1, kv_heads, L, head_dim]");
    TORCH_CHECK(k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32 && k.device().is_cpu() && v.device().is_cpu(), "row ", b, ": float32 CPU tensors only");
    TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.size(2) > 0 && H % k.size(1) == 0, "row ", b, ": bad layout");
  }
  const auto q = query.contiguous();
  auto out = torch::empty({B, 1, H, D}, query.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float s = static_cast<float>(scale);

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> p;
    for (int64_t b = b0; b < b1; ++b) {
      const auto& k = keys[b];
      const auto& v = values[b];
      const int64_t L = k.size(2), group = H / k.size(1);
      const int64_t start = (window > 0 && L > window) ? L - window : 0;
      const float* kp = k.data_ptr<float>();
      const float* vp = v.data_ptr<float>();
      p.resize(L);
      for (int64_t h = 0; h < H; ++h) {
        const float* qh = qp + (b * H + h) * D;
        const float* kh = kp + (h / group) * k.stride(1);
        const float* vh = vp + (h / group) * v.stride(1);
        float m = -INFINITY;
        for (int64_t l = start; l < L; ++l) {
          const float* kl = kh + l * k.stride(2);
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += qh[d] * kl[d];
          p[l] = dot * s;
          m = std::max(m, p[l]);
        }
        float z = 0.f;
        for (int64_t l = start; l < L; ++l) z += (p[l] = std::exp(p[l] - m));
        float* oh = op + (b * H + h) * D;
        std::fill(oh, oh + D, 0.f);
        for (int64_t l = start; l < L; ++l) {
          const float* vl = vh + l * v.stride(2);
          const float w = p[l] / z;
          for (int64_t d = 0; d < D; ++d) oh[d] += w * vl[d];
        }
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rows_attention", &rows_attention, "each row's query against its own session's keys and values");
}
