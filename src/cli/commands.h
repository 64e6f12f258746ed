// Registration of the fp8kv subcommands; each add_* adds one subcommand whose callback does
// the work (and throws fp8kv::Error on refusal).
#pragma once

namespace CLI {
class App;
}

namespace fp8kv::cli {

// One declaration per subcommand, e.g. void add_inspect(CLI::App& app);  // cli/inspect.cpp
void add_convert(CLI::App& app);         // cli/convert.cpp
void add_inspect(CLI::App& app);         // cli/inspect.cpp
void add_convert(CLI::App& app);         // cli/convert.cpp
void add_attention_demo(CLI::App& app);  // cli/attention_demo.cpp
void add_make_model(CLI::App& app);      // cli/make_model.cpp
void add_calibrate(CLI::App& app);       // cli/calibrate.cpp
void add_eval(CLI::App& app);            // cli/eval.cpp
void add_generate(CLI::App& app);        // cli/generate.cpp
void add_demo(CLI::App& app);            // cli/demo.cpp
void add_bench_model(CLI::App& bench);   // cli/bench_model.cpp: `bench model`, under `bench`
void add_bench(CLI::App& app);           // cli/bench.cpp
void add_tokenize(CLI::App& app);        // cli/tokenize.cpp

}  // namespace fp8kv::cli
