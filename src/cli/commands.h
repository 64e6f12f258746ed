// Registration of the fp8kv subcommands; each add_* adds one subcommand whose callback does
// the work (and throws fp8kv::Error on refusal).
#pragma once

namespace CLI {
class App;
}

namespace fp8kv::cli {

// One declaration per subcommand, e.g. void add_inspect(CLI::App& app);  // cli/inspect.cpp

}  // namespace fp8kv::cli
