// the work (and throws fp8kv::Error on refusal).
#pragma once

namespace CLI {
class App;
}

namespace fp8kv::cli {

// One declaration per subcommand, e.g. void add_inspect(CLI::App& app);  // cli/inspect.cpp
void add_inspect(CLI::App& app);  // cli/inspect.cpp
void add_attention_demo(CLI::App& app);  // cli/attention_demo.cpp
void add_bench(CLI::App& app);  // cli/bench.cpp

}  // namespace fp8kv::cli
