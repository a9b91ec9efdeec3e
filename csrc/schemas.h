#pragma once
// Every pyssl operator schema. Declared once here and used twice: for torch.ops.pyssl (csrc/ops.cpp)
// and for torch.ops.pyssl_emu, the CUDA kernels run by the CPU emulator (csrc/emu/module.cpp).
// Autograd formulas and fake (meta) kernels are registered in Python (pyssl/ops.py).
#include <torch/library.h>

namespace pyssl {

inline void define_schemas(torch::Library& m) {
  // ---- fused L2-normalised similarity + InfoNCE (csrc/infonce) ---------------------------
  // NT-Xent over z = cat(view0, view1) of shape (2N, d): self-similarity excluded, row i's
  // positive is i +- N, mean over the 2N rows. Returns (loss, lse) where lse holds the
  // per-row log-sum-exp, the only state the backward needs besides z.
  m.def("ntxent_forward(Tensor z, float temperature, bool? tensor_cores=None) -> (Tensor loss, Tensor lse)");
  m.def("ntxent_backward(Tensor grad_loss, Tensor z, Tensor lse, float temperature, bool? tensor_cores=None) -> Tensor");
  // InfoNCE of query (M, d) against key (K, d), K >= M, positive of row i is key i; logits are
  // logit_scale * cos(query_i, key_j). symmetric=True is the CLIP loss (M == K): the mean of
  // the row and the column cross-entropies. lse_col is empty when symmetric=False.
  // tensor_cores (this family): whether CUDA fp16/bf16 input takes the tensor-core kernels; None
  // reads PYSSL_INFONCE_TENSOR_CORES. The autograd wrappers decide once per forward and pass the
  // same choice to the backward. The CPU kernels ignore it.
  // output_mask (backward): which of (grad_query, grad_key, grad_logit_scale) to compute, as
  // ATen's backward ops take it; a gradient left out comes back undefined (None in Python) and
  // its work is skipped (no key-side sweep for a detached key, as MoCo v3's momentum keys are).
  m.def(
      "infonce_forward(Tensor query, Tensor key, Tensor logit_scale, bool symmetric, bool? tensor_cores=None) "
      "-> (Tensor loss, Tensor lse_row, Tensor lse_col)");
  m.def(
      "infonce_backward(Tensor grad_loss, Tensor query, Tensor key, Tensor logit_scale, "
      "Tensor lse_row, Tensor lse_col, bool symmetric, bool? tensor_cores=None, "
      "bool[3] output_mask=[True, True, True]) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_logit_scale)");

  // ---- MoCo queue logits + cross-entropy (csrc/moco) --------------------------------------
  // Row i of query (N, d) has logits [S_i0, S_i1..S_iK]: S_i0 = cos(query_i, key_i) / T, then
  // S_ij = u_i . queue_j / T (queue rows used as stored, MoCo keeps them normalised);
  // loss = mean_i cross-entropy with class 0. One sweep over the queue; expected_queue holds
  // A_i = sum_j P_ij queue_j (float32/64), so the backward needs no queue and the caller may
  // enqueue into it right after the forward. output_mask as infonce_backward's: MoCo's key
  // comes from the momentum encoder and needs no gradient.
  m.def(
      "moco_forward(Tensor query, Tensor key, Tensor queue, float temperature) "
      "-> (Tensor loss, Tensor lse, Tensor expected_queue)");
  m.def(
      "moco_backward(Tensor grad_loss, Tensor query, Tensor key, Tensor lse, Tensor expected_queue, "
      "float temperature, bool[2] output_mask=[True, True]) -> (Tensor grad_query, Tensor grad_key)");

  // ---- momentum EMA over a parameter list (csrc/ema) --------------------------------------
  // ema[i] <- momentum * ema[i] + (1 - momentum) * online[i] for every pair, in place, one
  // pass (one kernel launch on CUDA) over all tensors; dtypes may differ between the lists.
  m.def("ema_update_(Tensor(a!)[] ema, Tensor[] online, float momentum) -> ()");

  // ---- batched image augmentations (csrc/augment) -----------------------------------------
  // The whole SimCLR-style pipeline in one op: N output images (N = len(source_index)), output
  // n reads images[source_index[n]] (several views of one image in one call). Per output image:
  // crop_boxes (top, left, height, width) resized bilinearly to (out_h, out_w), flip, colour
  // jitter with jitter_factors (brightness, contrast, saturation, hue; identity 1, 1, 1, 0)
  // applied in the order jitter_order (a permutation of 0..3), gray, Gaussian blur
  // (blur_sigma > 0, odd blur_kernel_size, reflect padding), solarize where value >=
  // solarize_threshold (+inf: never), then (x - mean) / std (empty mean/std: none). uint8 input
  // is scaled to [0, 1]; everything is computed in float32. No gradient (data augmentation).
  // blur_kernel_bound >= every blurred image's kernel size lets the CUDA kernel size its shared
  // memory without reading blur_kernel_size back (-1: read it, a device sync).
  m.def(
      "augment_fused(Tensor images, Tensor source_index, Tensor crop_boxes, Tensor flip, "
      "Tensor jitter_factors, Tensor jitter_order, Tensor gray, Tensor blur_sigma, "
      "Tensor blur_kernel_size, Tensor solarize_threshold, Tensor mean, Tensor std, "
      "int out_h, int out_w, ScalarType? out_dtype=None, bool channels_last=False, "
      "int blur_kernel_bound=-1) -> Tensor");
  // torchvision's RandomResizedCrop.get_params for N images of height x width from uniforms
  // (N, 4 * attempts) in [0, 1): columns [area | log aspect ratio | top | left] per attempt; the
  // first box that fits wins, else the central crop of clamped aspect ratio. Returns (N, 4) int64
  // boxes (top, left, height, width).
  m.def(
      "augment_draw_crops(Tensor uniforms, int height, int width, float scale_min, float scale_max, "
      "float ratio_min, float ratio_max) -> Tensor");
}

}  // namespace pyssl
