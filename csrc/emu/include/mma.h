#pragma once
// Shadow <mma.h> of the emulation build: nvcuda::wmma for 16x16x16 tiles of fp16 / bf16 with
// float accumulators. Every operation is warp-wide, as on the GPU: the 32 lanes must all reach it
// with the same pointer and stride (else an error). A fragment's elements are spread over the
// lanes as mma.sync.m16n8k16 spreads them (PTX ISA, "Matrix Fragments for mma.m16n8k16"), two
// n8 halves side by side, so each lane holds 8 elements of each 16 x 16 fragment.
#include <source_location>

#include "emu/runtime.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

// (row, col) of element e of `lane` in a 16 x 16 fragment (B: row = k, col = n).
template <typename Use>
inline void element_position(int lane, int e, int& row, int& col) {
  const int group = lane >> 2, in_group = lane & 3;
  if constexpr (std::is_same_v<Use, matrix_a>) {
    row = group + 8 * ((e >> 1) & 1);
    col = 2 * in_group + (e & 1) + 8 * (e >> 2);
  } else if constexpr (std::is_same_v<Use, matrix_b>) {
    const int i = e & 3;
    row = 2 * in_group + (i & 1) + 8 * (i >> 1);
    col = group + 8 * (e >> 2);
  } else {
    const int i = e & 3;
    row = group + 8 * (i >> 1);
    col = 2 * in_group + (i & 1) + 8 * (e >> 2);
  }
}

// Offset in memory (stride ldm, by rows or by columns) of element e of `lane`'s fragment.
template <typename Use>
inline size_t element_offset(int lane, int e, unsigned ldm, bool by_rows) {
  int r, c;
  element_position<Use>(lane, e, r, c);
  return by_rows ? static_cast<size_t>(r) * ldm + c : static_cast<size_t>(c) * ldm + r;
}

struct MemoryArgs {
  const void* ptr;
  unsigned ldm;
  int layout;
};

inline const char* same_memory_args(void* const* lanes, unsigned arrived) {
  if (arrived != 0xffffffffu) return "a wmma load/store reached by fewer than 32 lanes";
  const auto* first = static_cast<const MemoryArgs*>(lanes[0]);
  for (int l = 1; l < 32; ++l) {
    const auto* a = static_cast<const MemoryArgs*>(lanes[l]);
    if (a->ptr != first->ptr || a->ldm != first->ldm || a->layout != first->layout) {
      return "the lanes of a wmma load/store pass different pointers, strides or layouts";
    }
  }
  return nullptr;
}

inline void converge(const MemoryArgs& args, const std::source_location& where) {
  pyssl::emu::warp_collective(pyssl::emu::Collective::kCustom, 0xffffffffu, 0, 0, 32, &same_memory_args,
                              const_cast<MemoryArgs*>(&args), where);
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator implements wmma 16x16x16 only");
  using element_type = T;
  using use = Use;
  using layout = Layout;
  static constexpr int num_elements = 8;
  T x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T value) {
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = value;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* ptr, unsigned ldm,
                             const std::source_location& where = std::source_location::current()) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  constexpr bool by_rows = std::is_same_v<Layout, row_major>;
  const detail::MemoryArgs args{ptr, ldm, by_rows ? 0 : 1};
  detail::converge(args, where);
  const int lane = pyssl::emu::current_thread()->lane;
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = ptr[detail::element_offset<Use>(lane, e, ldm, by_rows)];
}

template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* ptr, unsigned ldm, layout_t layout,
                             const std::source_location& where = std::source_location::current()) {
  const detail::MemoryArgs args{ptr, ldm, layout};
  detail::converge(args, where);
  const int lane = pyssl::emu::current_thread()->lane;
  for (int e = 0; e < f.num_elements; ++e) {
    f.x[e] = ptr[detail::element_offset<accumulator>(lane, e, ldm, layout == mem_row_major)];
  }
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* ptr, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout,
                              const std::source_location& where = std::source_location::current()) {
  const detail::MemoryArgs args{ptr, ldm, layout};
  detail::converge(args, where);
  const int lane = pyssl::emu::current_thread()->lane;
  for (int e = 0; e < f.num_elements; ++e) {
    ptr[detail::element_offset<accumulator>(lane, e, ldm, layout == mem_row_major)] = f.x[e];
  }
}

namespace detail {

template <typename FD, typename FA, typename FB, typename FC>
struct MmaArgs {
  FD* d;
  const FA* a;
  const FB* b;
  const FC* c;
};

// D = A B + C over the whole warp: the products of fp16/bf16 operands are exact in float, the
// sums run in float in k order.
template <typename FD, typename FA, typename FB, typename FC>
const char* mma_complete(void* const* lanes, unsigned arrived) {
  if (arrived != 0xffffffffu) return "wmma::mma_sync reached by fewer than 32 lanes";
  float a[16][16], b[16][16], c[16][16];
  for (int l = 0; l < 32; ++l) {
    const auto* args = static_cast<const MmaArgs<FD, FA, FB, FC>*>(lanes[l]);
    for (int e = 0; e < 8; ++e) {
      int r, col;
      element_position<matrix_a>(l, e, r, col);
      a[r][col] = static_cast<float>(args->a->x[e]);
      element_position<matrix_b>(l, e, r, col);
      b[r][col] = static_cast<float>(args->b->x[e]);
      element_position<accumulator>(l, e, r, col);
      c[r][col] = static_cast<float>(args->c->x[e]);
    }
  }
  float d[16][16];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float s = c[i][j];
      for (int k = 0; k < 16; ++k) s += a[i][k] * b[k][j];
      d[i][j] = s;
    }
  }
  for (int l = 0; l < 32; ++l) {
    const auto* args = static_cast<const MmaArgs<FD, FA, FB, FC>*>(lanes[l]);
    for (int e = 0; e < 8; ++e) {
      int r, col;
      element_position<accumulator>(l, e, r, col);
      args->d->x[e] = static_cast<typename FD::element_type>(d[r][col]);
    }
  }
  return nullptr;
}

}  // namespace detail

template <typename TD, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, 16, 16, 16, TD>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, TC>& c,
                     const std::source_location& where = std::source_location::current()) {
  using FD = fragment<accumulator, 16, 16, 16, TD>;
  using FA = fragment<matrix_a, 16, 16, 16, TA, LA>;
  using FB = fragment<matrix_b, 16, 16, 16, TB, LB>;
  using FC = fragment<accumulator, 16, 16, 16, TC>;
  detail::MmaArgs<FD, FA, FB, FC> args{&d, &a, &b, &c};
  pyssl::emu::warp_collective(pyssl::emu::Collective::kCustom, 0xffffffffu, 0, 0, 32,
                              &detail::mma_complete<FD, FA, FB, FC>, &args, where);
}

}  // namespace nvcuda::wmma
