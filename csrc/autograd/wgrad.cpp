// C++ autograd functions of the fused weight-gradient layers, used while an optimizer
// wrapper is attached, so that a layer costs no Python on either pass:
//   fastaccum::linear_wgrad     fastaccum.nn.Linear
//   fastaccum::embedding_wgrad  fastaccum.nn.Embedding
//
// linear_wgrad. Forward is F.linear. Backward always makes the input gradient; the weight gradient goes
// one of two ways, decided by the wrapper through `control` (a float64 CPU tensor it owns):
//   control[0] != 0  (the wrapper's opt.backward is running; the value is the micro-batch
//                     weight): weight_accum += control[0] * grad_out^T @ input with one
//                     GEMM (beta = 1) and bias_accum += control[0] * grad_out.sum(0); no
//                     dW is made and the weight and bias get no gradient. Then
//                     control[1] += 1 and control[2 + slot] += 1, which tell the wrapper
//                     which layers wrote their accumulators.
//   control[0] == 0: the weight and bias gradients are returned as nn.Linear's are.
// Autograd runs one backward per device at a time and each layer owns its slot, so the
// counters are not contended within a backward pass.
//
// embedding_wgrad. Forward is F.embedding (padding_idx < 0: none). Backward, while
// control[0] != 0, adds control[0] * grad_out[i] into row indices[i] of weight_accum
// (index_add_; the padding row gets nothing, as in torch) and counts the call as above;
// with control[0] == 0 it returns the dense weight gradient made the same way.
//
// Device-agnostic: it calls ATen ops only. Low-precision inputs are upcast to the fp32
// accumulator's dtype (activation-sized copies); the Python layer keeps CUDA bf16/fp16 on
// its own path, which feeds them to a GEMM with fp32 output instead.
#include <torch/autograd.h>
#include <torch/library.h>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kInputs = 7;  // forward arguments, each of which gets a gradient slot

class LinearWgrad : public torch::autograd::Function<LinearWgrad> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& weight_accum,
                            const std::optional<at::Tensor>& bias_accum,
                            const at::Tensor& control, int64_t slot) {
    // input and weight go through save_for_backward so that saved-tensor hooks (activation
    // offload, quantization) see them; the accumulators and the control tensor are state
    // the backward writes, not activations.
    ctx->save_for_backward({input, weight});
    ctx->saved_data["weight_accum"] = weight_accum;
    ctx->saved_data["bias_accum"] = bias_accum.has_value() ? *bias_accum : at::Tensor();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["control"] = control;
    ctx->saved_data["slot"] = slot;
    return at::linear(input, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    at::Tensor grad_out = grads[0];
    if (grad_out.scalar_type() != weight.scalar_type()) {
      grad_out = grad_out.to(weight.scalar_type());
    }
    variable_list out(kInputs);
    if (ctx->needs_input_grad(0)) out[0] = grad_out.matmul(weight);
    const at::Tensor go2 = grad_out.reshape({-1, grad_out.size(-1)});
    const at::Tensor x2 = input.reshape({-1, input.size(-1)});
    at::Tensor control = ctx->saved_data["control"].toTensor();
    double* ctl = control.data_ptr<double>();
    const double alpha = ctl[0];
    if (alpha != 0.0 && ctx->needs_input_grad(1)) {
      at::NoGradGuard no_grad;
      at::Tensor accum = ctx->saved_data["weight_accum"].toTensor();
      const auto acc_type = accum.scalar_type();
      const at::Tensor go = go2.scalar_type() == acc_type ? go2 : go2.to(acc_type);
      const at::Tensor x = x2.scalar_type() == acc_type ? x2 : x2.to(acc_type);
      accum.addmm_(go.t(), x, /*beta=*/1.0, /*alpha=*/alpha);
      at::Tensor bias_accum = ctx->saved_data["bias_accum"].toTensor();
      if (bias_accum.defined()) {
        bias_accum.add_(go2.sum(0, /*keepdim=*/false, acc_type), alpha);
      }
      ctl[1] += 1.0;
      ctl[2 + ctx->saved_data["slot"].toInt()] += 1.0;
      return out;
    }
    if (ctx->needs_input_grad(1)) out[1] = go2.t().mm(x2);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) out[2] = go2.sum(0);
    return out;
  }
};

class EmbeddingWgrad : public torch::autograd::Function<EmbeddingWgrad> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& indices,
                            const at::Tensor& weight, int64_t padding_idx,
                            const at::Tensor& weight_accum, const at::Tensor& control,
                            int64_t slot) {
    ctx->save_for_backward({indices});
    ctx->saved_data["weight_accum"] = weight_accum;
    ctx->saved_data["control"] = control;
    ctx->saved_data["slot"] = slot;
    ctx->saved_data["padding_idx"] = padding_idx;
    ctx->saved_data["weight_shape"] = weight.sizes().vec();
    ctx->saved_data["weight_dtype"] = weight.scalar_type();
    return at::embedding(weight, indices, padding_idx);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);
    if (!ctx->needs_input_grad(1)) return out;
    const at::Tensor flat_idx = ctx->get_saved_variables()[0].reshape({-1});
    const at::Tensor& grad_out = grads[0];
    at::Tensor rows = grad_out.reshape({-1, grad_out.size(-1)});
    const int64_t padding_idx = ctx->saved_data["padding_idx"].toInt();
    if (padding_idx >= 0) {  // the padding row gets no gradient, as in torch
      rows = rows.masked_fill(flat_idx.eq(padding_idx).unsqueeze(1), 0);
    }
    at::Tensor control = ctx->saved_data["control"].toTensor();
    double* ctl = control.data_ptr<double>();
    const double alpha = ctl[0];
    if (alpha != 0.0) {
      at::NoGradGuard no_grad;
      at::Tensor accum = ctx->saved_data["weight_accum"].toTensor();
      accum.index_add_(0, flat_idx, rows.to(accum.scalar_type()), alpha);
      ctl[1] += 1.0;
      ctl[2 + ctx->saved_data["slot"].toInt()] += 1.0;
      return out;
    }
    const auto shape = ctx->saved_data["weight_shape"].toIntVector();
    at::Tensor grad_w = at::zeros(shape, rows.options());
    grad_w.index_add_(0, flat_idx, rows);
    out[1] = grad_w.to(ctx->saved_data["weight_dtype"].toScalarType());
    return out;
  }
};

void check_control(const at::Tensor& control, int64_t slot) {
  TORCH_CHECK(control.device().is_cpu() && control.scalar_type() == at::kDouble &&
                  control.dim() == 1 && control.is_contiguous(),
              "control must be a contiguous 1-D float64 CPU tensor, got ",
              control.scalar_type(), " of shape ", control.sizes(), " on ", control.device());
  const int64_t n = control.sym_numel().guard_int(__FILE__, __LINE__);
  TORCH_CHECK(slot >= 0 && slot + 2 < n, "slot ", slot, " is out of range for a control tensor of ",
              n, " elements (slots 0..", n - 3, ")");
}

void check_accum(const at::Tensor& accum, const at::Tensor& param, const char* name) {
  TORCH_CHECK(accum.sizes() == param.sizes() && accum.device() == param.device(), name,
              " must match its parameter's shape ", param.sizes(), " and device ",
              param.device(), ", got ", accum.sizes(), " on ", accum.device());
  TORCH_CHECK(accum.scalar_type() == at::kFloat, name, " must be float32, got ",
              accum.scalar_type());
}

at::Tensor linear_wgrad_autograd(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const at::Tensor& weight_accum,
                                 const std::optional<at::Tensor>& bias_accum,
                                 const at::Tensor& control, int64_t slot) {
  check_control(control, slot);
  check_accum(weight_accum, weight, "weight_accum");
  const bool has_bias = bias.has_value() && bias->defined();
  if (bias_accum.has_value() && bias_accum->defined()) {
    TORCH_CHECK(has_bias, "bias_accum given for a layer without bias");
    check_accum(*bias_accum, *bias, "bias_accum");
  } else {
    // Without an accumulator a fused backward would drop the bias gradient.
    TORCH_CHECK(!has_bias || !bias->requires_grad(),
                "the bias requires grad but no bias_accum was given; pass its fp32 "
                "accumulator, or a bias that does not require grad");
  }
  return LinearWgrad::apply(input, weight, bias, weight_accum, bias_accum, control, slot);
}

at::Tensor embedding_wgrad_autograd(const at::Tensor& indices, const at::Tensor& weight,
                                    int64_t padding_idx, const at::Tensor& weight_accum,
                                    const at::Tensor& control, int64_t slot) {
  check_control(control, slot);
  check_accum(weight_accum, weight, "weight_accum");
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D (num_embeddings, embedding_dim), got ",
              weight.dim(), "-D");
  TORCH_CHECK(padding_idx < weight.size(0), "padding_idx must be < num_embeddings (",
              weight.size(0), ") or negative for none, got ", padding_idx);
  return EmbeddingWgrad::apply(indices, weight, padding_idx, weight_accum, control, slot);
}

at::Tensor embedding_wgrad_plain(const at::Tensor& indices, const at::Tensor& weight,
                                 int64_t padding_idx, const at::Tensor& /*weight_accum*/,
                                 const at::Tensor& /*control*/, int64_t /*slot*/) {
  return at::embedding(weight, indices, padding_idx);
}

// Below autograd (no gradient wanted, meta and fake tensors): plain F.linear.
at::Tensor linear_wgrad_plain(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              const at::Tensor& /*weight_accum*/,
                              const std::optional<at::Tensor>& /*bias_accum*/,
                              const at::Tensor& /*control*/, int64_t /*slot*/) {
  return at::linear(input, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastaccum, Autograd, m) {
  m.impl("linear_wgrad", &linear_wgrad_autograd);
  m.impl("embedding_wgrad", &embedding_wgrad_autograd);
}

TORCH_LIBRARY_IMPL(fastaccum, CompositeExplicitAutograd, m) {
  m.impl("linear_wgrad", &linear_wgrad_plain);
  m.impl("embedding_wgrad", &embedding_wgrad_plain);
}
