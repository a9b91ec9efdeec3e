// The CUDA emulator's scheduler: blocks, fibers, barriers, warp collectives, launch checks,
// and the memory guards that turn out-of-bounds accesses into errors naming the kernel.
#include "emu/launch.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>
#include <link.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace pyssl::emu {

uintptr_t g_stack_begin = 0, g_stack_end = 0;
ThreadContext** g_slot_contexts = nullptr;

const DeviceLimits& limits() {
  static const DeviceLimits value;
  return value;
}

namespace {

constexpr uint64_t kPoisonBits = ~uint64_t{0};

size_t page_size() {
  static const size_t value = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return value;
}

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

std::string short_path(const char* file) {
  std::string path = file;
  const size_t at = path.rfind("csrc/");
  return at == std::string::npos ? path : path.substr(at);
}

std::string site(const std::source_location& where) {
  return short_path(where.file_name()) + ":" + std::to_string(where.line());
}

const char* collective_name(Collective op) {
  switch (op) {
    case Collective::kSyncwarp: return "__syncwarp";
    case Collective::kShflIdx: return "__shfl_sync";
    case Collective::kShflUp: return "__shfl_up_sync";
    case Collective::kShflDown: return "__shfl_down_sync";
    case Collective::kShflXor: return "__shfl_xor_sync";
    case Collective::kBallot: return "__ballot_sync";
    case Collective::kAny: return "__any_sync";
    case Collective::kAll: return "__all_sync";
    case Collective::kMatch: return "__match_any_sync";
    case Collective::kCustom: return "a warp-wide matrix operation";
  }
  return "?";
}

}  // namespace

// ---- fibers ------------------------------------------------------------------------------------

#if defined(__x86_64__)
// Saves the callee-saved registers and the SSE / x87 control words on the current stack, stores
// the stack pointer to *save_sp and continues on new_sp (as saved by an earlier switch, or laid
// out by init_stack).
extern "C" void pyssl_emu_switch(void** save_sp, void* new_sp);
extern "C" void pyssl_emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl pyssl_emu_switch
  .hidden pyssl_emu_switch
  .type pyssl_emu_switch,@function
pyssl_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pyssl_emu_switch,.-pyssl_emu_switch

  .p2align 4
  .globl pyssl_emu_trampoline
  .hidden pyssl_emu_trampoline
  .type pyssl_emu_trampoline,@function
pyssl_emu_trampoline:
  movq %r12, %rdi
  andq $-16, %rsp
  call pyssl_emu_fiber_entry
  ud2
  .size pyssl_emu_trampoline,.-pyssl_emu_trampoline
)");
#endif

extern "C" __attribute__((visibility("hidden"), used)) void pyssl_emu_fiber_entry(void* fiber);

namespace {

enum class State : uint8_t { kRunnable, kBarrier, kWarp, kExited };

struct Fiber {
  ThreadContext ctx;
  State state = State::kRunnable;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  // The collective this thread waits in.
  Collective op = Collective::kSyncwarp;
  unsigned mask = 0;
  int arg = 0, width = 32;
  uint64_t value = 0, result = 0;
  CollectiveFn fn = nullptr;
  void* fn_arg = nullptr;
  std::source_location where;
  // cp.async copies not yet waited for; group = the commit group they belong to.
  struct PendingCopy {
    void* dst;
    const void* src;
    int group;
  };
  std::vector<PendingCopy> copies;
  int open_group = 0;

  void land_copies(int below_group) {
    size_t kept = 0;
    for (const PendingCopy& c : copies) {
      if (c.group < below_group) {
        std::memcpy(c.dst, c.src, 16);
      } else {
        copies[kept++] = c;
      }
    }
    copies.resize(kept);
  }
};

struct ErrorLog {
  std::string first;
  int count = 0;
  void add(const std::string& message) {
    if (count++ == 0) first = message;
  }
};

// ---- memory guards --------------------------------------------------------------------------

struct GuardedRegion {
  uintptr_t begin, end;  // the buffer
  const char* what;
};

// Guard pages of the live guarded buffers, keyed by the guard page's address.
std::mutex& guard_mutex() {
  static std::mutex m;
  return m;
}
std::map<uintptr_t, GuardedRegion>& guards() {
  static std::map<uintptr_t, GuardedRegion> m;
  return m;
}
// Guard pages a fault made accessible during a launch (re-protected when it ends).
constexpr int kMaxOpenedGuards = 4096;
std::atomic<uintptr_t> g_opened_guards[kMaxOpenedGuards];
std::atomic<int> g_opened_count{0};

void register_guard(uintptr_t guard_page, GuardedRegion region) {
  std::lock_guard<std::mutex> lock(guard_mutex());
  guards()[guard_page] = region;
}

void unregister_guard(uintptr_t guard_page) {
  std::lock_guard<std::mutex> lock(guard_mutex());
  guards().erase(guard_page);
}

// Dynamic shared memory: one arena whose end is a guard page; each launch's buffer ends there.
struct SharedArena {
  unsigned char* base = nullptr;
  size_t capacity = 0;
  unsigned char* guard = nullptr;
  unsigned char* current = nullptr;

  void prepare(size_t n) {
    if (base == nullptr) {
      capacity = round_up(static_cast<size_t>(limits().shared_per_block_optin), page_size());
      void* mem = mmap(nullptr, capacity + page_size(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(mem != MAP_FAILED, "pyssl CUDA emulator: cannot map the shared-memory arena");
      base = static_cast<unsigned char*>(mem);
      guard = base + capacity;
      mprotect(guard, page_size(), PROT_NONE);
    }
    current = guard - round_up(n, 16);
    register_guard(reinterpret_cast<uintptr_t>(guard),
                   {reinterpret_cast<uintptr_t>(current), reinterpret_cast<uintptr_t>(guard), "dynamic shared memory"});
  }

  void poison() { std::memset(current, 0xFF, static_cast<size_t>(guard - current)); }
};



std::atomic<bool> g_abandon{false};  // a fatal error in some block: every worker stops

class Scheduler {
 public:
  int worker = 0;  // its threads' stacks are slots [worker * kMaxThreadsPerWorker, ...)
  SharedArena arena;

  // ---- one launch ----
  const char* kernel = "";
  KernelBody body{};
  dim3 grid, block;
  int threads = 0;
  std::mt19937_64 rng;
  ErrorLog errors;
  bool abandon = false;  // a fatal error: stop this block and the launch

  // ---- one block ----
  std::vector<Fiber> fibers;
  std::vector<int> runnable;
  int alive = 0, at_barrier = 0;
  Fiber* running = nullptr;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
  uint64_t fp_control = 0;  // mxcsr, and the x87 control word in the high half, as the switch stores them
#else
  ucontext_t scheduler_uc;
#endif

  std::string where_now() const {
    std::ostringstream s;
    if (running != nullptr) {
      const ThreadContext& t = running->ctx;
      s << "block (" << t.block_idx.x << ", " << t.block_idx.y << ", " << t.block_idx.z << ") thread ("
        << t.thread_idx.x << ", " << t.thread_idx.y << ", " << t.thread_idx.z << ")";
    }
    return s.str();
  }

  std::string prefix(const ThreadContext* t) const {
    std::ostringstream s;
    s << "pyssl CUDA emulator: kernel " << kernel;
    if (t != nullptr) {
      s << ", block (" << t->block_idx.x << ", " << t->block_idx.y << ", " << t->block_idx.z << ")";
    }
    s << ": ";
    return s.str();
  }

  void fatal(const std::string& what, const ThreadContext* t) {
    errors.add(prefix(t) + what);
    abandon = true;
    g_abandon = true;
  }

  // ---- stacks: this worker's slice of the one stack region ----
  unsigned char* stacks = nullptr;

  void init_fiber(int i) {
    Fiber& f = fibers[i];
    g_slot_contexts[worker * kMaxThreadsPerWorker + i] = &f.ctx;
    f.state = State::kRunnable;
    f.copies.clear();
    f.open_group = 0;
    unsigned char* top = stacks + static_cast<size_t>(i + 1) * kStackBytes;
#if defined(__x86_64__)
    auto* sp = reinterpret_cast<uint64_t*>(top) - 8;
    sp[0] = fp_control;  // mxcsr (low half) and the x87 control word (high half)
    sp[1] = sp[2] = sp[3] = 0;                     // r15 r14 r13
    sp[4] = reinterpret_cast<uint64_t>(&f);        // r12: the trampoline's argument
    sp[5] = sp[6] = 0;                             // rbx rbp
    sp[7] = reinterpret_cast<uint64_t>(&pyssl_emu_trampoline);
    f.sp = sp;
#else
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = stacks + static_cast<size_t>(i) * kStackBytes + page_size();
    f.uc.uc_stack.ss_size = kStackBytes - page_size();
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, reinterpret_cast<void (*)()>(&fiber_entry_ucontext), 2,
                static_cast<int>(reinterpret_cast<uintptr_t>(&f) & 0xffffffffu),
                static_cast<int>(reinterpret_cast<uintptr_t>(&f) >> 32));
#endif
  }

#if !defined(__x86_64__)
  static void fiber_entry_ucontext(int lo, int hi) {
    pyssl_emu_fiber_entry(reinterpret_cast<void*>((static_cast<uintptr_t>(static_cast<unsigned>(hi)) << 32) |
                                                  static_cast<unsigned>(lo)));
  }
#endif

  void resume(Fiber* f) {
    running = f;
#if defined(__x86_64__)
    pyssl_emu_switch(&scheduler_sp, f->sp);
#else
    swapcontext(&scheduler_uc, &f->uc);
#endif
  }

  // From a fiber: back to the scheduler; returns when the scheduler resumes this fiber.
  void yield() {
    Fiber* f = running;
#if defined(__x86_64__)
    pyssl_emu_switch(&f->sp, scheduler_sp);
#else
    swapcontext(&f->uc, &scheduler_uc);
#endif
  }

  void make_runnable(Fiber& f) {
    f.state = State::kRunnable;
    runnable.push_back(static_cast<int>(&f - fibers.data()));
  }

  // ---- one block ----
  void run_block(uint3 block_idx) {
    fibers.resize(threads);  // no thread is suspended between blocks, so they may move
    runnable.clear();
    for (int i = 0; i < threads; ++i) {
      ThreadContext& t = fibers[i].ctx;
      t.thread_idx = {static_cast<unsigned>(i) % block.x, (static_cast<unsigned>(i) / block.x) % block.y,
                      static_cast<unsigned>(i) / (block.x * block.y)};
      t.block_idx = block_idx;
      t.block_dim = block;
      t.grid_dim = grid;
      t.linear = i;
      t.lane = i % kWarpSize;
      t.warp = i / kWarpSize;
      init_fiber(i);
      runnable.push_back(i);
    }
    alive = threads;
    at_barrier = 0;
    while (!abandon && !g_abandon) {
      if (runnable.empty()) {
        if (alive > 0) report_deadlock();
        break;
      }
      const size_t pick = static_cast<size_t>(rng() % runnable.size());
      Fiber* f = &fibers[runnable[pick]];
      runnable[pick] = runnable.back();
      runnable.pop_back();
      resume(f);
      if (abandon || g_abandon) break;
      after_yield(*f);
    }
    running = nullptr;
  }

  void after_yield(Fiber& f) {
    switch (f.state) {
      case State::kExited:
        --alive;
        check_barrier();
        complete_warp_groups(f.ctx.warp);
        break;
      case State::kBarrier:
        ++at_barrier;
        check_barrier();
        break;
      case State::kWarp:
        try_complete(f.ctx.warp, f.mask);
        break;
      case State::kRunnable:
        break;
    }
  }

  void check_barrier() {
    if (at_barrier == 0 || at_barrier < alive) return;
    Fiber* first = nullptr;
    for (Fiber& f : fibers) {
      if (f.state != State::kBarrier) continue;
      if (first == nullptr) {
        first = &f;
      } else if (f.where.line() != first->where.line() ||
                 std::strcmp(f.where.file_name(), first->where.file_name()) != 0) {
        fatal("divergent __syncthreads: thread " + std::to_string(first->ctx.linear) + " waits at " +
                  site(first->where) + ", thread " + std::to_string(f.ctx.linear) + " at " + site(f.where),
              &f.ctx);
        return;
      }
    }
    if (alive < threads) {
      fatal("__syncthreads at " + site(first->where) + " reached by " + std::to_string(at_barrier) + " of " +
                std::to_string(threads) + " threads; the other " + std::to_string(threads - alive) +
                " exited without reaching it (a barrier in conditional code: a hang or worse on a GPU)",
            &first->ctx);
      return;
    }
    for (Fiber& f : fibers) {
      if (f.state == State::kBarrier) make_runnable(f);
    }
    at_barrier = 0;
  }

  unsigned existing_lanes(int warp) const {
    const int first = warp * kWarpSize;
    const int count = std::min(kWarpSize, threads - first);
    return count >= 32 ? 0xffffffffu : ((1u << count) - 1u);
  }

  void complete_warp_groups(int warp) {
    const int base = warp * kWarpSize;
    const unsigned lanes = existing_lanes(warp);
    for (int l = 0; l < kWarpSize && !abandon; ++l) {
      if (!(lanes >> l & 1u)) break;
      Fiber& f = fibers[base + l];
      if (f.state == State::kWarp) try_complete(warp, f.mask);
    }
  }

  void try_complete(int warp, unsigned mask) {
    const int base = warp * kWarpSize;
    const unsigned members = mask & existing_lanes(warp);
    unsigned arrived = 0;
    Fiber* lead = nullptr;
    for (int l = 0; l < kWarpSize; ++l) {
      if (!(members >> l & 1u)) continue;
      Fiber& f = fibers[base + l];
      if (f.state == State::kExited) continue;  // the documented rule: non-exited lanes take part
      if (f.state != State::kWarp || f.mask != mask) return;  // not there yet
      arrived |= 1u << l;
      if (lead == nullptr) lead = &f;
    }
    if (lead == nullptr) return;
    for (int l = 0; l < kWarpSize; ++l) {
      if (!(arrived >> l & 1u)) continue;
      const Fiber& f = fibers[base + l];
      if (f.op != lead->op || f.width != lead->width || f.fn != lead->fn) {
        fatal(std::string("lanes of warp ") + std::to_string(warp) + " meet in different warp collectives: lane " +
                  std::to_string(lead->ctx.lane) + " in " + collective_name(lead->op) + " at " + site(lead->where) +
                  ", lane " + std::to_string(l) + " in " + collective_name(f.op) + " at " + site(f.where),
              &f.ctx);
        return;
      }
    }
    complete(base, arrived, *lead);
    for (int l = 0; l < kWarpSize; ++l) {
      if (arrived >> l & 1u) make_runnable(fibers[base + l]);
    }
  }

  void complete(int base, unsigned arrived, const Fiber& lead) {
    const int width = lead.width;
    auto value_of = [&](int src) -> uint64_t {
      return (arrived >> src & 1u) ? fibers[base + src].value : kPoisonBits;  // an absent source: undefined
    };
    switch (lead.op) {
      case Collective::kSyncwarp:
        break;
      case Collective::kShflIdx:
      case Collective::kShflUp:
      case Collective::kShflDown:
      case Collective::kShflXor:
        for (int l = 0; l < kWarpSize; ++l) {
          if (!(arrived >> l & 1u)) continue;
          Fiber& f = fibers[base + l];
          const int segment = l / width * width;
          int src = l;
          switch (lead.op) {
            case Collective::kShflIdx: src = segment + (f.arg % width + width) % width; break;
            case Collective::kShflUp: src = l - f.arg >= segment ? l - f.arg : l; break;
            case Collective::kShflDown: src = l + f.arg < segment + width ? l + f.arg : l; break;
            default: {
              const int x = l ^ f.arg;
              src = (x >= 0 && x < kWarpSize && x / width <= l / width) ? x : l;
            }
          }
          f.result = value_of(src);
        }
        break;
      case Collective::kBallot:
      case Collective::kAny:
      case Collective::kAll: {
        unsigned votes = 0;
        for (int l = 0; l < kWarpSize; ++l) {
          if ((arrived >> l & 1u) && fibers[base + l].value != 0) votes |= 1u << l;
        }
        const uint64_t out = lead.op == Collective::kBallot ? votes
                             : lead.op == Collective::kAny  ? uint64_t{votes != 0}
                                                            : uint64_t{votes == arrived};
        for (int l = 0; l < kWarpSize; ++l) {
          if (arrived >> l & 1u) fibers[base + l].result = out;
        }
        break;
      }
      case Collective::kMatch:
        for (int l = 0; l < kWarpSize; ++l) {
          if (!(arrived >> l & 1u)) continue;
          unsigned same = 0;
          for (int k = 0; k < kWarpSize; ++k) {
            if ((arrived >> k & 1u) && fibers[base + k].value == fibers[base + l].value) same |= 1u << k;
          }
          fibers[base + l].result = same;
        }
        break;
      case Collective::kCustom: {
        void* args[kWarpSize] = {};
        for (int l = 0; l < kWarpSize; ++l) {
          if (arrived >> l & 1u) args[l] = fibers[base + l].fn_arg;
        }
        if (const char* error = lead.fn(args, arrived)) {
          fatal(std::string(error) + " at " + site(lead.where), &lead.ctx);
        }
        break;
      }
    }
  }

  void report_deadlock() {
    std::ostringstream s;
    s << "deadlock: no thread can run; ";
    int barrier = 0;
    const Fiber* barrier_first = nullptr;
    std::map<std::string, int> warp_waits;
    for (const Fiber& f : fibers) {
      if (f.state == State::kBarrier) {
        if (barrier++ == 0) barrier_first = &f;
      } else if (f.state == State::kWarp) {
        std::ostringstream w;
        w << collective_name(f.op) << " (mask 0x" << std::hex << f.mask << std::dec << ") at " << site(f.where);
        ++warp_waits[w.str()];
      }
    }
    if (barrier > 0) s << barrier << " threads wait in __syncthreads at " << site(barrier_first->where) << "; ";
    for (const auto& [what, count] : warp_waits) s << count << " threads wait in " << what << "; ";
    s << threads - alive << " exited";
    fatal(s.str(), &fibers[0].ctx);
  }

  // ---- calls from fibers ----
  uint64_t warp_op(Collective op, unsigned mask, uint64_t value, int arg, int width, CollectiveFn fn, void* fn_arg,
                   const std::source_location& where) {
    Fiber* f = running;
    if (!(mask >> f->ctx.lane & 1u)) {
      fatal(std::string(collective_name(op)) + " at " + site(where) + ": lane " + std::to_string(f->ctx.lane) +
                " calls it with a mask (0x" + hex(mask) + ") that leaves out its own lane",
            &f->ctx);
      yield();
    }
    if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0) {
      fatal(std::string(collective_name(op)) + " at " + site(where) + ": width " + std::to_string(width) +
                " is not a power of two <= 32",
            &f->ctx);
      yield();
    }
    f->state = State::kWarp;
    f->op = op;
    f->mask = mask;
    f->value = value;
    f->arg = arg;
    f->width = width;
    f->fn = fn;
    f->fn_arg = fn_arg;
    f->where = where;
    yield();
    return f->result;
  }

  void barrier(const std::source_location& where) {
    Fiber* f = running;
    f->state = State::kBarrier;
    f->where = where;
    yield();
  }

  static std::string hex(unsigned v) {
    std::ostringstream s;
    s << std::hex << v;
    return s.str();
  }
};

// One scheduler per block worker (the calling thread is worker 0), never destroyed: a fiber
// abandoned by an error may still point into one at exit.
std::vector<Scheduler*> g_workers;

// The scheduler of the running emulated thread (null outside a kernel).
Scheduler* current_scheduler() {
  const int64_t slot = current_stack_slot();
  return slot < 0 ? nullptr : g_workers[slot / kMaxThreadsPerWorker];
}

Scheduler& scheduler() {
  Scheduler* s = current_scheduler();
  TORCH_CHECK(s != nullptr, "pyssl CUDA emulator: a device function called outside a kernel");
  return *s;
}

struct sigaction g_previous_segv;
std::atomic<bool> g_in_launch{false};

void on_segv(int sig, siginfo_t* info, void* uctx) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
  const uintptr_t page = addr & ~(static_cast<uintptr_t>(page_size()) - 1);
  bool ours = false;
  GuardedRegion region{};
  if (g_in_launch.load() && guard_mutex().try_lock()) {
    auto it = guards().find(page);
    if (it != guards().end()) {
      ours = true;
      region = it->second;
    }
    guard_mutex().unlock();
  }
  if (!ours) {  // not an emulated out-of-bounds access: let the previous handler or the default act
    sigaction(SIGSEGV, &g_previous_segv, nullptr);
    return;
  }
  std::ostringstream m;
  m << "out-of-bounds access " << (addr - region.end) << " bytes past the end of " << region.what << " of "
    << (region.end - region.begin) << " bytes";
  if (Scheduler* s = current_scheduler()) {
    m << " by " << s->where_now();
    s->errors.add(s->prefix(s->running != nullptr ? &s->running->ctx : nullptr) + m.str());
  } else {
    g_workers[0]->errors.add("pyssl CUDA emulator: " + m.str());
  }
  mprotect(reinterpret_cast<void*>(page), page_size(), PROT_READ | PROT_WRITE);  // let the access finish
  const int slot = g_opened_count.fetch_add(1);
  if (slot < kMaxOpenedGuards) g_opened_guards[slot] = page;
  (void)sig;
  (void)uctx;
}

std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

std::atomic<uint64_t> g_seed{0x5eed};
std::atomic<int64_t> g_launches{0};
std::unordered_map<const void*, int>& smem_optin() {
  static std::unordered_map<const void*, int> m;
  return m;
}

class GuardedAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t page = page_size();
    const size_t payload = round_up(std::max<size_t>(n, 1), 16);
    const size_t span = round_up(payload, page) + page;
    void* mem = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(mem != MAP_FAILED, "pyssl CUDA emulator: the guarded allocator cannot map ", span, " bytes");
    auto* base = static_cast<unsigned char*>(mem);
    unsigned char* guard = base + span - page;
    mprotect(guard, page, PROT_NONE);
    unsigned char* data = guard - payload;
    std::memset(data, 0xFF, payload);
    register_guard(reinterpret_cast<uintptr_t>(guard),
                   {reinterpret_cast<uintptr_t>(data), reinterpret_cast<uintptr_t>(guard), "a global buffer"});
    {
      std::lock_guard<std::mutex> lock(mapping_mutex());
      mappings()[data] = Mapping{base, span, guard};
    }
    // The context is the data pointer itself, as with c10's own CPU allocator: some CPU kernels
    // (oneDNN's bf16 matmul) require DataPtr::get() == get_context(). The mapping is looked up.
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  // Makes raw_allocate / raw_deallocate (oneDNN's scratch buffers) go through the guards too.
  c10::DeleterFnPtr raw_deleter() const override { return &release; }

 private:
  struct Mapping {
    unsigned char* base;
    size_t span;
    unsigned char* guard;
  };
  static std::mutex& mapping_mutex() {
    static std::mutex m;
    return m;
  }
  static std::unordered_map<void*, Mapping>& mappings() {
    static std::unordered_map<void*, Mapping> m;
    return m;
  }
  static void release(void* data) {
    Mapping m{};
    {
      std::lock_guard<std::mutex> lock(mapping_mutex());
      auto it = mappings().find(data);
      if (it == mappings().end()) return;
      m = it->second;
      mappings().erase(it);
    }
    unregister_guard(reinterpret_cast<uintptr_t>(m.guard));
    munmap(m.base, m.span);
  }
};

GuardedAllocator g_guarded_allocator;

// Static __shared__ arrays are thread_local objects of this library (runtime.h), and they are all
// the thread-local storage it has (tests/test_cuda_emulator.py checks the symbol table): the
// library's thread-local block, filled with 0xFF before each block runs, is the poisoned shared
// memory a GPU block starts with.
thread_local unsigned char g_tls_anchor;

struct TlsBlock {
  unsigned char* data = nullptr;
  size_t size = 0;
};

TlsBlock this_threads_tls_block() {
  g_tls_anchor = 0;  // the block exists once touched
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&set_seed), &info) == 0) return {};
  void* handle = dlopen(info.dli_fname, RTLD_NOLOAD | RTLD_LAZY);
  if (handle == nullptr) return {};
  void* data = nullptr;
  const bool ok = dlinfo(handle, RTLD_DI_TLS_DATA, &data) == 0 && data != nullptr;
  dlclose(handle);
  if (!ok) return {};
  struct Search {
    const void* base;
    size_t size;
  } search{info.dli_fbase, 0};
  dl_iterate_phdr(
      [](dl_phdr_info* phdr, size_t, void* arg) {
        auto* s = static_cast<Search*>(arg);
        for (int i = 0; i < phdr->dlpi_phnum; ++i) {
          if (phdr->dlpi_phdr[i].p_type == PT_TLS && s->base != nullptr) {
            // The object whose lowest loaded segment starts at dli_fbase.
            const uintptr_t start = phdr->dlpi_addr;
            for (int j = 0; j < phdr->dlpi_phnum; ++j) {
              if (phdr->dlpi_phdr[j].p_type == PT_LOAD) {
                if (start + phdr->dlpi_phdr[j].p_vaddr - phdr->dlpi_phdr[j].p_offset ==
                    reinterpret_cast<uintptr_t>(s->base)) {
                  s->size = phdr->dlpi_phdr[i].p_memsz;
                  return 1;
                }
                break;
              }
            }
          }
        }
        return 0;
      },
      &search);
  return {static_cast<unsigned char*>(data), search.size};
}
c10::Allocator* g_previous_allocator = nullptr;

#if defined(__x86_64__)
uint64_t current_fp_control() {
  uint32_t mxcsr = 0;
  uint16_t fpcw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  return static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpcw) << 32);
}
#endif

}  // namespace

// ---- block workers ------------------------------------------------------------------------------

struct LaunchJob {
  const char* kernel;
  KernelBody body;
  dim3 grid, block;
  int threads;
  size_t dynamic_smem;
  const std::vector<uint64_t>* order;
  uint64_t seed;
  uint64_t fp_control = 0;
  std::atomic<uint64_t> next{0};
};

// Worker w runs blocks of the job until none is left: its own fibers, stacks, arena and shared
// arrays (its OS thread's thread-local block), so blocks run side by side as on an SM array.
void work_on(Scheduler& s, LaunchJob& job) {
  s.kernel = job.kernel;
  s.body = job.body;
  s.grid = job.grid;
  s.block = job.block;
  s.threads = job.threads;
  s.abandon = false;
  s.rng.seed(job.seed + static_cast<uint64_t>(s.worker) * 0x9E3779B97F4A7C15ull);
  s.fp_control = job.fp_control;
  s.arena.prepare(job.dynamic_smem);
  const TlsBlock shared_statics = this_threads_tls_block();
  const std::vector<uint64_t>& order = *job.order;
  const dim3 grid = job.grid;
  for (;;) {
    const uint64_t i = job.next.fetch_add(1);
    if (i >= order.size() || g_abandon) break;
    const uint64_t b = order[i];
    if (shared_statics.size > 0) std::memset(shared_statics.data, 0xFF, shared_statics.size);
    s.arena.poison();
    s.run_block({static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                 static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))});
    if (s.abandon) break;
  }
}

// The pool's threads wait on it for the life of the process: it is never destroyed (a destroyed
// condition variable with waiters would hang the exit).
struct Pool {
  std::mutex mutex;
  std::condition_variable wake, done;
  LaunchJob* job = nullptr;
  uint64_t generation = 0;
  int busy = 0;
};

Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

void pool_thread(int worker) {
  Pool& p = pool();
  uint64_t seen = 0;
  for (;;) {
    LaunchJob* job;
    {
      std::unique_lock<std::mutex> lock(p.mutex);
      p.wake.wait(lock, [&] { return p.generation != seen; });
      seen = p.generation;
      job = p.job;
    }
    work_on(*g_workers[worker], *job);
    std::lock_guard<std::mutex> lock(p.mutex);
    if (--p.busy == 0) p.done.notify_all();
  }
}

int worker_count() {
  if (const char* env = std::getenv("PYSSL_EMU_WORKERS")) {
    const int n = std::atoi(env);
    if (n >= 1) return std::min(n, 64);
  }
  return static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 8u));
}

// The stack region and one scheduler per worker, once (the calling thread is worker 0).
void ensure_workers() {
  if (!g_workers.empty()) return;
  const int workers = worker_count();
  const size_t slots = static_cast<size_t>(workers) * kMaxThreadsPerWorker;
  const size_t bytes = slots * kStackBytes;
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(mem != MAP_FAILED, "pyssl CUDA emulator: cannot map ", bytes, " bytes of thread stacks");
  auto* base = static_cast<unsigned char*>(mem);
  for (size_t i = 0; i < slots; ++i) mprotect(base + i * kStackBytes, page_size(), PROT_NONE);  // overflow guard
  g_slot_contexts = new ThreadContext*[slots]();
  g_stack_begin = reinterpret_cast<uintptr_t>(base);
  g_stack_end = g_stack_begin + bytes;
  for (int w = 0; w < workers; ++w) {
    auto* s = new Scheduler();
    s->worker = w;
    s->stacks = base + static_cast<size_t>(w) * kMaxThreadsPerWorker * kStackBytes;
    s->fibers.reserve(kMaxThreadsPerWorker);
    g_workers.push_back(s);
  }
  for (int w = 1; w < workers; ++w) std::thread(pool_thread, w).detach();
}

void run_on_workers(LaunchJob& job) {
  const int helpers = static_cast<int>(g_workers.size()) - 1;
  const bool parallel = helpers > 0 && job.order->size() > 1;
  Pool& p = pool();
  if (parallel) {
    std::lock_guard<std::mutex> lock(p.mutex);
    p.job = &job;
    p.busy = helpers;
    ++p.generation;
    p.wake.notify_all();
  }
  work_on(*g_workers[0], job);
  if (parallel) {
    std::unique_lock<std::mutex> lock(p.mutex);
    p.done.wait(lock, [&] { return p.busy == 0; });
  }
}

// ---- the API -----------------------------------------------------------------------------------

uint64_t warp_collective(Collective op, unsigned mask, uint64_t value, int arg, int width, CollectiveFn fn,
                         void* fn_arg, const std::source_location& where) {
  return scheduler().warp_op(op, mask, value, arg, width, fn, fn_arg, where);
}

void block_barrier(const std::source_location& where) { scheduler().barrier(where); }

void kernel_error(const char* what, const std::source_location& where, bool fatal) {
  Scheduler& s = scheduler();
  const std::string message = std::string(what) + " at " + site(where) + " (" + s.where_now() + ")";
  if (fatal) {
    s.fatal(message, &s.running->ctx);
    s.yield();  // never resumed
  } else {
    s.errors.add(s.prefix(&s.running->ctx) + message);
  }
}

unsigned char* dynamic_shared_memory() { return scheduler().arena.current; }

void set_max_dynamic_shared_memory(const void* kernel_id, int bytes) {
  TORCH_CHECK(bytes >= 0 && bytes <= limits().shared_per_block_optin,
              "pyssl CUDA emulator: cudaFuncAttributeMaxDynamicSharedMemorySize ", bytes,
              " exceeds the H200's opt-in limit of ", limits().shared_per_block_optin, " bytes");
  std::lock_guard<std::mutex> lock(launch_mutex());
  smem_optin()[kernel_id] = bytes;
}

void set_seed(uint64_t seed) { g_seed = seed; }
uint64_t seed() { return g_seed; }
int64_t launch_count() { return g_launches; }

namespace {
std::atomic<int64_t> g_host_calls[static_cast<int>(HostCall::kCount)];
}

void record_host_call(HostCall call) { ++g_host_calls[static_cast<int>(call)]; }
int64_t host_call_count(HostCall call) { return g_host_calls[static_cast<int>(call)]; }

bool set_guarded_allocation(bool enabled) {
  const bool was = g_previous_allocator != nullptr;
  if (enabled && !was) {
    g_previous_allocator = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&g_guarded_allocator, /*priority=*/255);
  } else if (!enabled && was) {
    c10::SetCPUAllocator(g_previous_allocator, /*priority=*/255);
    g_previous_allocator = nullptr;
  }
  return was;
}

void launch(const char* kernel_name, const void* kernel_id, dim3 grid, dim3 block, size_t dynamic_smem,
            KernelBody body) {
  const DeviceLimits& lim = limits();
  const std::string who = std::string("pyssl CUDA emulator: kernel ") + kernel_name + ": launch rejected (";
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  TORCH_CHECK(block.x > 0 && block.y > 0 && block.z > 0 && threads <= uint64_t(lim.max_threads_per_block) &&
                  block.z <= unsigned(lim.max_block_dim_z),
              who, "invalid configuration argument): block (", block.x, ", ", block.y, ", ", block.z, ") has ",
              threads, " threads, at most ", lim.max_threads_per_block, " allowed");
  TORCH_CHECK(grid.x > 0 && grid.y > 0 && grid.z > 0 && grid.x <= unsigned(lim.max_grid_dim_x) &&
                  grid.y <= unsigned(lim.max_grid_dim_yz) && grid.z <= unsigned(lim.max_grid_dim_yz),
              who, "invalid configuration argument): grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");

  std::lock_guard<std::mutex> lock(launch_mutex());
  int allowed = lim.shared_per_block;
  if (auto it = smem_optin().find(kernel_id); it != smem_optin().end()) allowed = std::max(allowed, it->second);
  TORCH_CHECK(dynamic_smem <= static_cast<size_t>(allowed), who, "too many resources requested): ", dynamic_smem,
              " bytes of dynamic shared memory, the kernel may use ", allowed,
              allowed == lim.shared_per_block ? " without cudaFuncAttributeMaxDynamicSharedMemorySize" : "");

  ensure_workers();
  const int64_t launch_index = g_launches++;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  // Blocks in a random order: a kernel whose result depends on the order of its blocks is wrong.
  std::mt19937_64 order_rng(g_seed.load() * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(launch_index));
  std::vector<uint64_t> order(blocks);
  for (uint64_t b = 0; b < blocks; ++b) order[b] = b;
  std::shuffle(order.begin(), order.end(), order_rng);

  LaunchJob job;
  job.kernel = kernel_name;
  job.body = body;
  job.grid = grid;
  job.block = block;
  job.threads = static_cast<int>(threads);
  job.dynamic_smem = dynamic_smem;
  job.order = &order;
  job.seed = order_rng();
#if defined(__x86_64__)
  job.fp_control = current_fp_control();
#endif
  g_abandon = false;
  g_opened_count = 0;
  for (Scheduler* w : g_workers) w->errors = ErrorLog{};  // a worker this launch leaves idle reports nothing

  struct sigaction action {};
  action.sa_sigaction = &on_segv;
  action.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&action.sa_mask);
  sigaction(SIGSEGV, &action, &g_previous_segv);
  g_in_launch = true;

  run_on_workers(job);

  g_in_launch = false;
  sigaction(SIGSEGV, &g_previous_segv, nullptr);
  const int opened = std::min(g_opened_count.load(), kMaxOpenedGuards);
  for (int i = 0; i < opened; ++i) mprotect(reinterpret_cast<void*>(g_opened_guards[i].load()), page_size(), PROT_NONE);
  ErrorLog all;
  for (Scheduler* w : g_workers) {
    if (w->errors.count == 0) continue;
    if (all.count == 0) all.first = w->errors.first;
    all.count += w->errors.count;
  }
  if (all.count > 0) {
    TORCH_CHECK(false, all.first, all.count > 1 ? " (and " + std::to_string(all.count - 1) + " more faults)" : std::string());
  }
}

}  // namespace pyssl::emu

unsigned __activemask() {
  pyssl::emu::Scheduler& s = pyssl::emu::scheduler();
  const int base = s.running->ctx.warp * pyssl::emu::kWarpSize;
  unsigned mask = 0;
  for (int l = 0; l < pyssl::emu::kWarpSize && base + l < s.threads; ++l) {
    if (s.fibers[base + l].state != pyssl::emu::State::kExited) mask |= 1u << l;
  }
  return mask;
}

extern "C" void pyssl_emu_fiber_entry(void* fiber) {
  pyssl::emu::Scheduler& s = pyssl::emu::scheduler();
  s.body.run(s.body.ctx);
  auto* f = static_cast<pyssl::emu::Fiber*>(fiber);
  f->land_copies(1 << 30);  // a thread that exits with copies in flight: they land all the same
  f->state = pyssl::emu::State::kExited;
  s.yield();
  __builtin_trap();  // an exited thread is never resumed
}

// ---- out-of-bounds indices of arrays with a known bound (-fsanitize=bounds) ----------------------
// The emulation build instruments array indexing (shared tiles declared as arrays, local arrays)
// and resolves the checks here instead of in a sanitizer runtime: the fault becomes an error of
// the running kernel.
namespace {
struct UbsanSourceLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct UbsanTypeDescriptor {
  uint16_t kind;
  uint16_t info;
  char name[1];
};
struct UbsanOutOfBounds {
  UbsanSourceLocation loc;
  const UbsanTypeDescriptor* array_type;
  const UbsanTypeDescriptor* index_type;
};

void report_out_of_bounds(UbsanOutOfBounds* data, uintptr_t index) {
  std::ostringstream m;
  m << "index " << static_cast<intptr_t>(index) << " out of bounds for type " << data->array_type->name << " at "
    << pyssl::emu::short_path(data->loc.file) << ":" << data->loc.line;
  pyssl::emu::Scheduler* s = pyssl::emu::current_scheduler();
  if (s == nullptr) {
    TORCH_CHECK(false, "pyssl CUDA emulator (host code): ", m.str());
  }
  m << " (" << s->where_now() << ")";
  s->errors.add(s->prefix(&s->running->ctx) + m.str());
}
}  // namespace

extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_out_of_bounds(void* data, void* index) {
  report_out_of_bounds(static_cast<UbsanOutOfBounds*>(data), reinterpret_cast<uintptr_t>(index));
}
extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_out_of_bounds_abort(void* data, void* index) {
  report_out_of_bounds(static_cast<UbsanOutOfBounds*>(data), reinterpret_cast<uintptr_t>(index));
}

// ---- cp.async (csrc/ptx.h) -----------------------------------------------------------------------
namespace pyssl::ptx {

void cp_async_16(void* shared_dst, const void* global_src, const std::source_location& where) {
  if (reinterpret_cast<uintptr_t>(shared_dst) % 16 != 0 || reinterpret_cast<uintptr_t>(global_src) % 16 != 0) {
    ::pyssl::emu::kernel_error("cp.async of 16 bytes from or to an address that is not 16-byte aligned", where, true);
  }
  pyssl::emu::Fiber* f = pyssl::emu::scheduler().running;
  std::memset(shared_dst, 0xFF, 16);  // what a read before the covering wait_group sees
  f->copies.push_back({shared_dst, global_src, f->open_group});
}

void cp_async_commit() { ++pyssl::emu::scheduler().running->open_group; }

void cp_async_wait(int pending_groups) {
  pyssl::emu::Fiber* f = pyssl::emu::scheduler().running;
  f->land_copies(f->open_group - pending_groups);
}

}  // namespace pyssl::ptx
