#include "cli/parallel.h"

#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "fp8kv/threaded_communicator.h"
#include "fp8kv/error.h"
#include "fp8kv/nccl.h"

#if defined(FP8KV_HAVE_CUDA)
#include <cuda_runtime.h>
#endif

extern char** environ;

namespace fp8kv::cli {
namespace {

// The hidden options of a --tp rank process (one subcommand runs per process, so one copy).
int g_tp_rank = -1;
std::string g_tp_rendezvous;

// This process's argv, as the kernel has it.
[[maybe_unused]] std::vector<std::string> own_argv() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> args;
  std::string cur;
  for (char c : all) {
    if (c == '\0') {
      args.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) args.push_back(cur);
  if (args.empty()) throw Error("--tp: cannot read this process's command line");
  return args;
}

[[maybe_unused]] std::string self_exe() {
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) throw Error("--tp: cannot resolve /proc/self/exe");
  self[n] = '\0';
  return self;
}

[[maybe_unused]] std::string temp_dir() {
  const char* t = std::getenv("TMPDIR");
  std::string dir = (t != nullptr && *t != '\0') ? t : "/tmp";
  if (dir.back() != '/') dir += '/';
  return dir;
}

[[maybe_unused]] std::string tail_of(const std::string& path, size_t max_chars) {
  std::ifstream in(path, std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return all.size() > max_chars ? all.substr(all.size() - max_chars) : all;
}

[[maybe_unused]] int gpu_count() {
#if defined(FP8KV_HAVE_CUDA)
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

// A --tp rank process: join the NCCL group (which selects GPU `rank`, so that the body's
// make_device("cuda") lands there) and run the body once.
void run_rank_process(int tp, const std::function<void(Communicator&)>& body) {
  if (g_tp_rank >= tp) {
    throw Error("--tp-rank " + std::to_string(g_tp_rank) + " not in [0, " + std::to_string(tp) +
                ")");
  }
  auto comm = make_nccl_communicator(g_tp_rank, tp, /*device=*/g_tp_rank, g_tp_rendezvous);
  body(*comm);
}

// The parent of `--tp N --device cuda`: one child process per GPU, each this executable with
// this command line plus the hidden rank options. Rank 0 prints; the others log to a file that
// the error message quotes when they fail.
void spawn_rank_processes(int tp) {
#if !defined(FP8KV_HAVE_CUDA)
  (void)tp;
  throw Error(
      "--device cuda: this fp8kv build has no CUDA backend (it was built without nvcc); "
      "rebuild with CUDA (FP8KV_CUDA=AUTO or ON) or use --device cpu");
#elif !defined(FP8KV_HAVE_NCCL)
  (void)tp;
  throw Error("--tp " + std::to_string(tp) +
              " --device cuda: this fp8kv was built without NCCL (one process per GPU needs "
              "it); use --device cpu");
#else
  const int found = gpu_count();
  if (found < tp) {
    throw Error("--tp " + std::to_string(tp) + " needs " + std::to_string(tp) + " GPUs, found " +
                std::to_string(found));
  }
  std::string dir_template = temp_dir() + "fp8kv_tp_XXXXXX";
  if (mkdtemp(dir_template.data()) == nullptr) {
    throw Error("--tp: cannot create a temporary directory under " + temp_dir());
  }
  const std::string dir = dir_template;
  const std::string rendezvous = dir + "/nccl_id";
  set_nccl_safety_env();  // the children inherit it

  const std::string exe = self_exe();
  const std::vector<std::string> base = own_argv();
  std::vector<pid_t> children(tp, -1);
  std::vector<std::string> logs(tp);
  std::string spawn_error;
  for (int r = 0; r < tp; ++r) {
    std::vector<std::string> args = base;
    args.insert(args.end(), {"--tp-rank", std::to_string(r), "--tp-rendezvous", rendezvous});
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);

    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    if (r > 0) {
      logs[r] = dir + "/rank" + std::to_string(r) + ".log";
      posix_spawn_file_actions_addopen(&actions, 1, logs[r].c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                       0644);
      posix_spawn_file_actions_adddup2(&actions, 1, 2);
    }
    pid_t pid = -1;
    const int rc = posix_spawn(&pid, exe.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) {
      spawn_error =
          "--tp: cannot start rank " + std::to_string(r) + " (" + exe + "): " + std::strerror(rc);
      break;
    }
    children[r] = pid;
  }

  // Wait for every child; the first failure stops the others (they would wait in NCCL).
  int running = 0;
  for (pid_t pid : children) running += pid > 0 ? 1 : 0;
  if (!spawn_error.empty()) {
    for (pid_t pid : children) {
      if (pid > 0) kill(pid, SIGTERM);
    }
  }
  std::string failure;
  while (running > 0) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, 0);
    if (pid < 0) {
      if (errno == EINTR) continue;
      break;
    }
    int rank = -1;
    for (int r = 0; r < tp; ++r) {
      if (children[r] == pid) rank = r;
    }
    if (rank < 0) continue;  // not ours
    children[rank] = -1;
    --running;
    const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (ok || !failure.empty() || !spawn_error.empty()) continue;
    failure = "--tp " + std::to_string(tp) + ": rank " + std::to_string(rank) +
              (WIFEXITED(status) ? " exited with code " + std::to_string(WEXITSTATUS(status))
                                 : " was killed by signal " + std::to_string(WTERMSIG(status)));
    if (!logs[rank].empty()) {
      const std::string log = tail_of(logs[rank], 2000);
      if (!log.empty()) failure += "; its output ends:\n" + log;
    }
    for (pid_t other : children) {
      if (other > 0) kill(other, SIGTERM);
    }
  }
  for (const std::string& log : logs) {
    if (!log.empty()) std::remove(log.c_str());
  }
  std::remove(rendezvous.c_str());
  std::remove((rendezvous + ".tmp").c_str());
  rmdir(dir.c_str());
  if (!spawn_error.empty()) throw Error(spawn_error);
  if (!failure.empty()) throw Error(failure);
#endif
}

}  // namespace

std::string resolve_device(const std::string& device, int tp, std::string* why) {
  if (device != "auto") return device;
#if !defined(FP8KV_HAVE_CUDA)
  (void)tp;
  *why = "this fp8kv was built without CUDA";
  return "cpu";
#else
  const int found = gpu_count();
  if (found < tp) {
    *why = found == 0 ? "no GPU found"
                      : std::to_string(found) + " GPU(s) found, --tp " + std::to_string(tp) +
                            " needs " + std::to_string(tp);
    return "cpu";
  }
  for (int d = 0; d < tp; ++d) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) {
      cudaGetLastError();
      *why = "cannot query GPU " + std::to_string(d);
      return "cpu";
    }
    if (prop.major != 9) {  // the kernels are compiled for sm_90a only
      *why = "GPU " + std::to_string(d) + " (" + prop.name + ", sm_" + std::to_string(prop.major) +
             std::to_string(prop.minor) + ") is not a Hopper GPU, which this build's kernels need";
      return "cpu";
    }
    if (d == 0) *why = std::string(prop.name);
  }
  return "cuda";
#endif
}

void add_cuda_graph_options(CLI::App* cmd, CudaGraphChoice& choice, const std::string& help) {
  cmd->add_flag("--cuda-graph", choice.on, help + " (default: on with --device cuda at --tp 1)");
  cmd->add_flag("--no-cuda-graph", choice.off, "Run every decode step eagerly (no CUDA graphs)");
}

bool use_cuda_graph(const CudaGraphChoice& choice, const std::string& device, int tp) {
  if (choice.on && choice.off)
    throw Error("--cuda-graph and --no-cuda-graph contradict each other");
  if (choice.on) return true;
  if (choice.off) return false;
  return device == "cuda" && tp == 1;
}

void add_device_and_tp_options(CLI::App* cmd, std::string& device, int& tp) {
  const char* env = std::getenv("FP8KV_DEVICE");
  device = (env != nullptr && *env != '\0') ? env : "auto";
  cmd->add_option("--device", device,
                  "auto (cuda when this build has CUDA and a usable GPU, else cpu; default, or "
                  "$FP8KV_DEVICE), cpu, or cuda (GPU 0, with --tp N GPUs 0..N-1; bf16 weights)")
      ->capture_default_str();
  cmd->add_option("--tp", tp,
                  "Tensor-parallel ranks (Megatron-style head / intermediate split); with "
                  "--device cpu they run as threads of this process, with --device cuda as one "
                  "process per GPU over NCCL")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  // Set by the parent of `--tp N --device cuda` on each rank process it starts.
  cmd->add_option("--tp-rank", g_tp_rank, "This process's tensor-parallel rank (internal)")
      ->check(CLI::NonNegativeNumber)
      ->group("");
  cmd->add_option("--tp-rendezvous", g_tp_rendezvous,
                  "The NCCL rendezvous file of the rank processes (internal)")
      ->group("");
}

void run_tensor_parallel(int tp, std::string& device,
                         const std::function<void(Communicator&)>& body) {
  if (device == "auto") {
    std::string why;
    device = resolve_device(device, tp, &why);
    if (g_tp_rank < 0) std::fprintf(stderr, "device: %s (auto: %s)\n", device.c_str(), why.c_str());
  }
  if (device != "cpu" && device != "cuda") {
    throw Error("--device '" + device + "': expected auto, cpu or cuda");
  }
  if (g_tp_rank >= 0) {
    if (device != "cuda" || g_tp_rendezvous.empty()) {
      throw Error("--tp-rank is internal: it needs --device cuda and --tp-rendezvous");
    }
    run_rank_process(tp, body);
    return;
  }
  if (tp == 1) {
    auto single = make_single_communicator();
    body(*single);
    return;
  }
  if (device == "cpu") {
    run_ranks(tp, body);
    return;
  }
  spawn_rank_processes(tp);
}

}  // namespace fp8kv::cli
