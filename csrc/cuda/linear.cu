// CUDA kernels of pyowt::linear_bias_act and its backward, on cuBLASLt epilogues.
//
// Row-major tensors are column-major transposes, so with x (M, K), W (N, K), y (M, N):
//   forward   y^T (N x M)  = op_T(W^T)  x^T        epilogue BIAS / RELU_BIAS / RELU
//   dW        dW^T (K x N) = x^T  op_T(G^T)        epilogue BGRADB: grad_bias = sum over M
//   dX        dX^T (K x M) = W^T  G^T
// where G = grad_out * (out > 0) comes from a small mask kernel. (cuBLASLt's DRELU_BGRAD
// epilogue applies the ReLU derivative to the GEMM's *output*, i.e. to the layer below;
// our mask is on the GEMM's input, so it is a separate pass over M x N elements.)
//
// Compute is float32 for every dtype (CUBLAS_COMPUTE_32F: float32 inputs run in full
// precision, never TF32), split-K reductions included. If cuBLASLt offers no algorithm for
// an epilogue on some shape/arch, the GEMM runs without it and ATen adds the bias/ReLU/
// bias-gradient.
//
// Rounding: a 16-bit output must be act(x W^T + b) rounded once. cuBLASLt's split-K
// algorithms do not do that with a BIAS epilogue: measured on an H100 (cuBLASLt of CUDA
// 13.0, (130 x 257) -> 300 in bf16, 4-way split-K with float32 partial sums), 4927 of 39000
// outputs were off by more than the single rounding allows, the bias having been added
// after the sum was rounded to bf16, and 17 ReLU masks flipped (input-gradient relative
// error 0.036, nearly twice the test's bound). So when the heuristic picks a split-K
// algorithm for a 16-bit GEMM with a bias, the GEMM writes float32 instead and one small
// kernel adds the bias, applies the activation and rounds (split-K is picked for small
// outputs, where the extra pass over M x N float32 values is cheap).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <cstring>
#include <memory>
#include <optional>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "linear.h"

namespace pyowt {

namespace {

// cuBLASLt uses the workspace for split-K and stream-K kernels; 32 MiB is NVIDIA's advice
// for Hopper. It comes from torch's caching allocator on the current stream, so it is
// reused across calls without a cudaMalloc and without racing other streams.
constexpr int64_t kWorkspaceBytes = int64_t(32) << 20;
constexpr int kThreads = 256;

#define PYOWT_CUBLASLT_CHECK(call)                                                        \
  do {                                                                                    \
    const cublasStatus_t status_ = (call);                                                \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "cuBLASLt call ", #call, " failed: ",   \
                cublasLtGetStatusString(status_), " (status ", static_cast<int>(status_), \
                ")");                                                                     \
  } while (0)

// RAII owners of the cuBLASLt descriptors (destroyed even when a check throws).
struct MatmulDesc {
  cublasLtMatmulDesc_t d = nullptr;
  MatmulDesc() = default;
  MatmulDesc(const MatmulDesc&) = delete;
  MatmulDesc& operator=(const MatmulDesc&) = delete;
  ~MatmulDesc() { if (d) cublasLtMatmulDescDestroy(d); }
};
struct Layout {
  cublasLtMatrixLayout_t d = nullptr;
  Layout() = default;
  Layout(const Layout&) = delete;
  Layout& operator=(const Layout&) = delete;
  ~Layout() { if (d) cublasLtMatrixLayoutDestroy(d); }
};
struct Preference {
  cublasLtMatmulPreference_t d = nullptr;
  Preference() = default;
  Preference(const Preference&) = delete;
  Preference& operator=(const Preference&) = delete;
  ~Preference() { if (d) cublasLtMatmulPreferenceDestroy(d); }
};

cudaDataType_t cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "linear_bias_act (cuda): unsupported dtype ", t);
  }
}

// The largest power of two (<= 256) dividing the address: cuBLASLt assumes 256-byte aligned
// buffers unless told otherwise, and a view with a storage offset may not be.
uint32_t alignment_of(const void* p) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 1 && (addr % a) != 0) a /= 2;
  return a;
}

// One cuBLASLt GEMM set up once: its descriptors and the algorithm the heuristic chose.
struct LtPlan {
  MatmulDesc desc;
  Layout la, lb, ld;
  cublasLtMatmulAlgo_t algo = {};
  size_t workspace = 0;
  bool found = false;    // false: no algorithm for this epilogue (the caller falls back)
  bool split_k = false;  // the algorithm sums K in parts (see "Rounding" above)
};

// Everything the heuristic's answer depends on (ints first: no padding before the int64s).
struct LtKey {
  int device;
  int dtype;      // A and B
  int out_dtype;  // C and D
  int transa, transb;
  int epilogue;
  int64_t m, n, k, lda, ldb, ldd;
  uint32_t align_a, align_b, align_d, align_bias;
  bool operator==(const LtKey& o) const {
    return std::memcmp(this, &o, sizeof(LtKey)) == 0;
  }
};
static_assert(std::has_unique_object_representations_v<LtKey>,
              "LtKey is compared and hashed bytewise: it must have no padding");

struct LtKeyHash {
  size_t operator()(const LtKey& key) const {
    // FNV-1a over the key's bytes (it has no padding, see the static_assert).
    const auto* p = reinterpret_cast<const unsigned char*>(&key);
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < sizeof(LtKey); ++i) h = (h ^ p[i]) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

// Without this cache every call would create three layouts, a matmul descriptor and a
// preference, and run cublasLtMatmulAlgoGetHeuristic: host work on each layer's hot path,
// where AlexNet's FC GEMMs are host-bound (benchmarks/RESULTS.md). Per thread, so the
// cached descriptors (whose bias pointer is set per call) are never shared; bounded, since
// a data loader with ragged last batches or a sweep would otherwise grow it without end.
constexpr size_t kMaxCachedPlans = 256;

// `bias` is set on the descriptor before the heuristic runs (as every call sets it before
// its matmul), so the heuristic sees the epilogue's operands as they will be.
const LtPlan& lt_plan(const LtKey& key, cudaDataType_t dt, cudaDataType_t out_dt, void* bias) {
  thread_local std::unordered_map<LtKey, std::unique_ptr<LtPlan>, LtKeyHash> plans;
  auto it = plans.find(key);
  if (it != plans.end()) return *it->second;
  if (plans.size() >= kMaxCachedPlans) plans.clear();

  auto plan = std::make_unique<LtPlan>();
  const auto transa = static_cast<cublasOperation_t>(key.transa);
  const auto transb = static_cast<cublasOperation_t>(key.transb);
  const auto epilogue = static_cast<cublasLtEpilogue_t>(key.epilogue);
  PYOWT_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&plan->desc.d, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  PYOWT_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc.d, CUBLASLT_MATMUL_DESC_TRANSA, &transa, sizeof(transa)));
  PYOWT_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc.d, CUBLASLT_MATMUL_DESC_TRANSB, &transb, sizeof(transb)));
  PYOWT_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc.d, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  if (bias != nullptr) {
    PYOWT_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc.d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  }
  const bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
  const int64_t m = key.m, n = key.n, k = key.k;
  PYOWT_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->la.d, dt, ta ? k : m, ta ? m : k, key.lda));
  PYOWT_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->lb.d, dt, tb ? n : k, tb ? k : n, key.ldb));
  PYOWT_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->ld.d, out_dt, m, n, key.ldd));

  Preference pref;
  PYOWT_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&pref.d));
  uint64_t ws = kWorkspaceBytes;
  PYOWT_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  // Split-K partial sums are added in float32 (in the workspace), never in the output
  // dtype: the INPLACE and OUTPUT_TYPE schemes round every partial sum to bf16/fp16, which
  // costs accuracy and, in the forward, flips the sign (the ReLU mask) of small outputs.
  uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  PYOWT_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reduction, sizeof(reduction)));
  PYOWT_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.align_a, sizeof(key.align_a)));
  PYOWT_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.align_b, sizeof(key.align_b)));
  PYOWT_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.align_d, sizeof(key.align_d)));
  PYOWT_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.align_d, sizeof(key.align_d)));

  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(
      at::cuda::getCurrentCUDABlasLtHandle(), plan->desc.d, plan->la.d, plan->lb.d, plan->ld.d,
      plan->ld.d, pref.d, 1, &heuristic, &found);
  // No algorithm (an epilogue this cuBLASLt cannot fuse for this shape, dtype or
  // alignment, or an output dtype it does not pair with these inputs) is remembered too:
  // the caller then takes another route.
  if (hs == CUBLAS_STATUS_SUCCESS && found > 0) {
    plan->algo = heuristic.algo;
    plan->workspace = heuristic.workspaceSize;
    plan->found = true;
    uint32_t splits = 1, scheme = CUBLASLT_REDUCTION_SCHEME_NONE;
    size_t written = 0;
    PYOWT_CUBLASLT_CHECK(cublasLtMatmulAlgoConfigGetAttribute(&plan->algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits, sizeof(splits), &written));
    PYOWT_CUBLASLT_CHECK(cublasLtMatmulAlgoConfigGetAttribute(&plan->algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof(scheme), &written));
    plan->split_k = splits > 1 || scheme != CUBLASLT_REDUCTION_SCHEME_NONE;
  }
  return *plans.emplace(key, std::move(plan)).first->second;
}

// Column-major D (m x n, leading dim ldd) = op(A) op(B) with `epilogue`; A and B in
// `dtype`, D in `out_dtype`. `bias` is the BIAS input (length m) or the BGRADB output
// (length n). Returns false, having done nothing, when cuBLASLt has no algorithm for this
// epilogue here, or when `refuse_split_k` and its algorithm is a split-K one (the caller
// then takes another route).
bool lt_matmul(cublasOperation_t transa, cublasOperation_t transb, int64_t m, int64_t n, int64_t k,
               const void* a, int64_t lda, const void* b, int64_t ldb, void* d, int64_t ldd,
               at::ScalarType dtype, at::ScalarType out_dtype, cublasLtEpilogue_t epilogue,
               void* bias, const at::TensorOptions& options, bool refuse_split_k = false) {
  const LtKey key{options.device().index(), static_cast<int>(dtype), static_cast<int>(out_dtype),
                  static_cast<int>(transa), static_cast<int>(transb), static_cast<int>(epilogue),
                  m, n, k, lda, ldb, ldd, alignment_of(a), alignment_of(b), alignment_of(d),
                  bias != nullptr ? alignment_of(bias) : 0u};
  const LtPlan& plan = lt_plan(key, cuda_dtype(dtype), cuda_dtype(out_dtype), bias);
  if (!plan.found || (refuse_split_k && plan.split_k)) return false;
  if (bias != nullptr) {
    PYOWT_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(plan.desc.d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  }
  // Most algorithms need no workspace: then no allocation either (host time per call).
  at::Tensor workspace;
  if (plan.workspace > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace)}, options.dtype(at::kByte));
  }
  const float alpha = 1.0f, beta = 0.0f;
  PYOWT_CUBLASLT_CHECK(cublasLtMatmul(at::cuda::getCurrentCUDABlasLtHandle(), plan.desc.d, &alpha, a,
                                      plan.la.d, b, plan.lb.d, &beta, d, plan.ld.d, d, plan.ld.d,
                                      &plan.algo, plan.workspace > 0 ? workspace.data_ptr() : nullptr,
                                      plan.workspace, at::cuda::getCurrentCUDAStream()));
  return true;
}

// lt_matmul without an epilogue, for callers with no other route: a GEMM cuBLASLt cannot
// run at all is an error.
void lt_matmul_plain(cublasOperation_t transa, cublasOperation_t transb, int64_t m, int64_t n,
                     int64_t k, const void* a, int64_t lda, const void* b, int64_t ldb, void* d,
                     int64_t ldd, at::ScalarType dtype, at::ScalarType out_dtype,
                     const at::TensorOptions& options) {
  TORCH_CHECK(lt_matmul(transa, transb, m, n, k, a, lda, b, ldb, d, ldd, dtype, out_dtype,
                        CUBLASLT_EPILOGUE_DEFAULT, nullptr, options),
              "cuBLASLt has no algorithm for a ", m, "x", n, "x", k, " GEMM from ", dtype, " to ",
              out_dtype);
}

// y = act(acc + bias) rounded once to y's dtype; acc is float32 (m x n, row-major).
template <typename scalar_t>
__global__ void bias_act_round_kernel(const float* __restrict__ acc, const scalar_t* __restrict__ bias,
                                      scalar_t* __restrict__ y, int64_t total, int64_t n, bool relu) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total; i += stride) {
    float v = acc[i] + static_cast<float>(bias[i % n]);
    if (relu && v <= 0.0f) v = 0.0f;  // NaN stays NaN, as in cuBLASLt's ReLU and torch.relu
    y[i] = static_cast<scalar_t>(v);
  }
}

int64_t grid_for(int64_t total) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, sms * 32));
}

void bias_act_round(const at::Tensor& acc, const at::Tensor& bias, bool relu, at::Tensor& y) {
  const int64_t total = y.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "linear_bias_act_round_cuda", [&] {
    bias_act_round_kernel<scalar_t><<<grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        acc.const_data_ptr<float>(), bias.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
        total, y.size(1), relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
__global__ void relu_grad_mask_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                                      scalar_t* __restrict__ masked, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    masked[i] = out[i] > scalar_t(0) ? grad[i] : scalar_t(0);
  }
}

at::Tensor relu_grad_mask(const at::Tensor& grad, const at::Tensor& out) {
  at::Tensor masked = at::empty_like(grad);
  const int64_t n = grad.numel();
  if (n == 0) return masked;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "linear_relu_mask_cuda", [&] {
    relu_grad_mask_kernel<scalar_t><<<grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), masked.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return masked;
}

at::Tensor linear_bias_act_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                                const std::optional<at::Tensor>& bias_in,
                                c10::string_view activation) {
  const bool relu = linear_is_relu(activation);
  check_linear_args(x_in, weight_in, bias_in);
  TORCH_CHECK(x_in.is_cuda(), "linear_bias_act (cuda) got x on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t n = weight_in.size(0), k = weight_in.size(1);
  const at::Tensor x = as_matrix(x_in, k);
  const at::Tensor weight = weight_in.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  const int64_t m = x.size(0);

  at::Tensor y;
  if (m == 0 || n == 0 || k == 0) {
    // Nothing for a GEMM to do; ATen handles the degenerate shapes.
    y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    if (relu) y.relu_();
    return unflatten_rows(y, x_in, n);
  }
  y = at::empty({m, n}, x.options());
  const cublasLtEpilogue_t epilogue =
      relu ? (bias.has_value() ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU)
           : (bias.has_value() ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT);
  void* bias_ptr = bias.has_value() ? bias->data_ptr() : nullptr;
  const at::ScalarType dtype = x.scalar_type();
  // A 16-bit output with a bias must not come from a split-K epilogue (see "Rounding").
  const bool round_once_apart = dtype != at::kFloat && bias.has_value();
  const bool fused = lt_matmul(CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, weight.const_data_ptr(), k,
                               x.const_data_ptr(), k, y.data_ptr(), n, dtype, dtype, epilogue,
                               bias_ptr, x.options(), /*refuse_split_k=*/round_once_apart);
  if (!fused && round_once_apart) {
    at::Tensor acc = at::empty({m, n}, x.options().dtype(at::kFloat));
    lt_matmul_plain(CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, weight.const_data_ptr(), k,
                    x.const_data_ptr(), k, acc.data_ptr(), n, dtype, at::kFloat, x.options());
    bias_act_round(acc, *bias, relu, y);
  } else if (!fused) {
    lt_matmul_plain(CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, weight.const_data_ptr(), k,
                    x.const_data_ptr(), k, y.data_ptr(), n, dtype, dtype, x.options());
    if (bias.has_value()) y.add_(*bias);
    if (relu) y.relu_();
  }
  return unflatten_rows(y, x_in, n);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bias_act_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& out_in, c10::string_view activation, bool has_bias) {
  const bool relu = linear_is_relu(activation);
  check_linear_backward_args(grad_in, x_in, weight_in, out_in, relu);
  TORCH_CHECK(x_in.is_cuda(), "linear_bias_act_backward (cuda) got x on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t n = weight_in.size(0), k = weight_in.size(1);
  const at::Tensor x = as_matrix(x_in, k);
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor grad = as_matrix(grad_in, n);
  const int64_t m = x.size(0);
  const at::Tensor g = relu ? relu_grad_mask(grad, as_matrix(out_in, n)) : grad;

  auto bias_sum = [&] {
    return has_bias ? g.sum(0, /*keepdim=*/false, at::kFloat).to(g.scalar_type())
                    : at::empty({0}, g.options());
  };
  if (m == 0 || n == 0 || k == 0) {
    return {unflatten_rows(at::mm(g, weight), x_in, k), at::mm(g.t(), x), bias_sum()};
  }

  at::Tensor grad_w = at::empty({n, k}, x.options());
  at::Tensor grad_bias = at::empty({has_bias ? n : 0}, x.options());
  const at::ScalarType dtype = x.scalar_type();
  const bool fused = lt_matmul(CUBLAS_OP_N, CUBLAS_OP_T, k, n, m, x.const_data_ptr(), k,
                               g.const_data_ptr(), n, grad_w.data_ptr(), k, dtype, dtype,
                               has_bias ? CUBLASLT_EPILOGUE_BGRADB : CUBLASLT_EPILOGUE_DEFAULT,
                               has_bias ? grad_bias.data_ptr() : nullptr, x.options());
  if (!fused) {
    lt_matmul_plain(CUBLAS_OP_N, CUBLAS_OP_T, k, n, m, x.const_data_ptr(), k, g.const_data_ptr(), n,
                    grad_w.data_ptr(), k, dtype, dtype, x.options());
    grad_bias = bias_sum();
  }
  at::Tensor grad_x = at::empty({m, k}, x.options());
  lt_matmul_plain(CUBLAS_OP_N, CUBLAS_OP_N, k, m, n, weight.const_data_ptr(), k, g.const_data_ptr(), n,
                  grad_x.data_ptr(), k, dtype, dtype, x.options());
  return {unflatten_rows(grad_x, x_in, k), grad_w, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyowt, CUDA, m) {
  m.impl("linear_bias_act", &linear_bias_act_cuda);
  m.impl("linear_bias_act_backward", &linear_bias_act_backward_cuda);
}

}  // namespace pyowt
