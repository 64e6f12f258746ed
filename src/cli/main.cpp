// fp8kv: the command line. Each subcommand lives in its own file and is a thin layer over the
// library; main only registers them and turns an fp8kv::Error into a message and exit code 1.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>
#include <string>

#include "cli/commands.h"
#include "fp8kv/error.h"
#include "fp8kv/version.h"

int main(int argc, char** argv) {
  CLI::App app{"fp8kv: FP8 (E4M3) KV cache with calibrated scales"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("fp8kv ") + fp8kv::version());
  // One line per subcommand (declared in cli/commands.h).
  fp8kv::cli::add_inspect(app);
  fp8kv::cli::add_convert(app);
  fp8kv::cli::add_attention_demo(app);
  fp8kv::cli::add_make_model(app);
  fp8kv::cli::add_calibrate(app);
  fp8kv::cli::add_eval(app);
  fp8kv::cli::add_generate(app);
  fp8kv::cli::add_demo(app);
  fp8kv::cli::add_bench(app);
  fp8kv::cli::add_tokenize(app);
  if (argc == 1) {  // no command: the list of commands, not an error
    std::fputs(app.help().c_str(), stdout);
    return 0;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const fp8kv::Error& e) {
    std::fprintf(stderr, "fp8kv: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fp8kv: internal error: %s\n", e.what());
    return 2;
  }
  return 0;
}
