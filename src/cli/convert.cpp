// fp8kv convert: KV scales from any format fp8kv reads (load_kv_scales: kv_cache_calib.json in
// either of LightLLM's layouts, a quant-param JSON, vLLM / compressed-tensors or ModelOpt scale
// tensors, a model folder carrying them) into one engine's format (docs/FORMATS.md, "Other
// engines' formats"). Exact in float32 where the target holds the information; where it cannot,
// a refusal that names the option that makes the loss explicit (--reduce max, --drop-q-scales).
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "cli/commands.h"
#include "core/json_input.h"
#include "fp8kv/calib.h"
#include "fp8kv/error.h"
#include "fp8kv/kv_formats.h"
#include "fp8kv/scale_tensors.h"

namespace fp8kv::cli {
namespace {

namespace fs = std::filesystem;

constexpr const char* kFormats =
    "lightllm, lightllm-rank-layout, vllm-checkpoint, quant-param-json or modelopt";

struct ConvertOptions {
  std::string in, out, to;
  std::optional<int> tp;
  std::optional<int> num_kv_heads;
  std::optional<std::string> model;
  std::optional<std::string> reduce;
  bool drop_q_scales = false;
};

// What the --model folder's config.json says (architectures, layers, KV heads, model_type),
// read as raw JSON so that any architecture's folder works.
struct ModelFacts {
  std::optional<std::string> architectures, model_type;
  std::optional<int> num_layers, num_kv_heads;
};

ModelFacts model_facts(const std::string& dir) {
  const std::string path = (fs::path(dir) / "config.json").string();
  const detail::json root = detail::parse_json(detail::read_file_bounded(path), path);
  if (!root.is_object()) throw Error(path + ": expected a JSON object at the top level");
  const detail::FieldReader r(path, root);
  ModelFacts f;
  const detail::json& a = r.get("architectures");
  if (!a.is_array() || a.empty() || !a[0].is_string()) {
    r.fail("architectures", "expected an array of names, found " + detail::describe(a));
  }
  f.architectures = a[0].get<std::string>();
  if (r.has("model_type")) f.model_type = r.string("model_type");
  f.num_layers = r.integer("num_hidden_layers");
  f.num_kv_heads = r.has("num_key_value_heads") ? r.integer("num_key_value_heads")
                                                : r.integer("num_attention_heads");
  return f;
}

void run_convert(const ConvertOptions& opt) {
  std::error_code ec;
  if (opt.in == opt.out || (fs::exists(opt.out, ec) && fs::equivalent(opt.in, opt.out, ec))) {
    throw Error(fmt::format("convert: IN and OUT are the same file ({}); write elsewhere", opt.in));
  }
  const bool known = opt.to == "lightllm" || opt.to == "lightllm-rank-layout" ||
                     opt.to == "vllm-checkpoint" || opt.to == "quant-param-json" ||
                     opt.to == "modelopt";
  if (!known) throw Error(fmt::format("convert: --to: expected {}, found {}", kFormats, opt.to));
  if (opt.reduce && *opt.reduce != "max") {
    throw Error(fmt::format("convert: --reduce: expected max, found {}", *opt.reduce));
  }
  if (opt.to == "lightllm-rank-layout" && !opt.tp) {
    throw Error(
        "convert --to lightllm-rank-layout: --tp N is required (the ranks the file "
        "is for)");
  }

  ModelFacts facts;
  if (opt.model) facts = model_facts(*opt.model);
  CalibExpect expect;
  expect.num_kv_heads = opt.num_kv_heads ? opt.num_kv_heads : facts.num_kv_heads;
  if (opt.model && !opt.num_kv_heads) {
    expect.architectures = facts.architectures;
    expect.num_layers = facts.num_layers;
  }
  const LoadedScales loaded = load_kv_scales(opt.in, expect, opt.reduce.has_value());
  const CalibData& in = loaded.data;
  const int H = in.num_head;

  fmt::print("read {} ({}): {} layers, {}, num_head {}", opt.in, loaded.format, in.num_layers,
             quant_type_name(in.quant_type), in.rank_layout ? in.rank_layout->file_num_head : H);
  if (!loaded.detail.empty()) fmt::print("; {}", loaded.detail);
  if (in.rank_layout) {
    fmt::print(
        " (LightLLM's per-rank layout: {} KV heads, each written by {} ranks; largest "
        "disagreement between copies {})",
        H, in.rank_layout->copies, in.rank_layout->max_disagreement);
  }
  fmt::print("\n");

  // The one lossy step, only when asked for: where the target holds only per-layer scales, or
  // for any target with --reduce max (a per_tensor kv_cache_calib.json for fp8-per-tensor).
  CalibData d = in;
  const bool per_tensor_only = opt.to == "quant-param-json" || opt.to == "modelopt";
  if (d.quant_type == QuantType::kPerHead && (per_tensor_only || opt.reduce)) {
    if (!opt.reduce) {
      throw Error(fmt::format(
          "convert --to {}: the format holds one K and one V scale per layer, but {} is "
          "per_head ({} KV heads); --reduce max takes each layer's max over its heads",
          opt.to, opt.in, H));
    }
    d = reduce_to_per_tensor(d);
    fmt::print("reduced per_head to per_tensor: each layer's max over its {} KV heads\n", H);
  }
  // LightLLM's file holds static Q scales beside per_head K/V scales only (FORMATS.md).
  const bool holds_q = (opt.to == "lightllm" || opt.to == "lightllm-rank-layout") &&
                       d.quant_type == QuantType::kPerHead;
  if (d.q_scales && !holds_q) {
    if (!opt.drop_q_scales) {
      throw Error(fmt::format(
          "convert --to {}: {} has q_calibration (static Q scales), which {} cannot hold; "
          "--drop-q-scales writes the K/V scales without them",
          opt.to, opt.in,
          d.quant_type == QuantType::kPerTensor ? "a per_tensor file" : "the format"));
    }
    d.q_scales.reset();
    fmt::print("dropped q_calibration (static Q scales) as asked\n");
  }

  if (opt.to == "lightllm" || opt.to == "lightllm-rank-layout") {
    if (d.num_head < 1) {
      throw Error(
          fmt::format("convert --to {}: {} ({}) does not say how many KV heads the model "
                      "has; give --model DIR or --num-kv-heads N",
                      opt.to, opt.in, loaded.format));
    }
    if (d.architectures.empty()) {
      throw Error(
          fmt::format("convert --to {}: {} ({}) does not name the model's architectures; "
                      "give --model DIR",
                      opt.to, opt.in, loaded.format));
    }
    if (opt.to == "lightllm") {
      write_calib(opt.out, d);
      fmt::print("wrote {}: merged layout, num_head {} (one column per KV head)\n", opt.out,
                 d.num_head);
    } else {
      const CalibData result = to_rank_layout(d, *opt.tp);
      write_calib(opt.out, result);
      const int copies = result.num_head / d.num_head;
      fmt::print("wrote {}: LightLLM's per-rank layout for {} ranks, num_head {}{}\n", opt.out,
                 *opt.tp, result.num_head,
                 copies > 1
                     ? fmt::format(", each KV head written by {} ranks", copies)
                     : std::string(" (the same as the merged layout: no head is replicated)"));
    }
  } else if (opt.to == "quant-param-json") {
    const int tp = opt.tp.value_or(1);
    std::string model_type = facts.model_type.value_or("");
    detail::write_text_atomic(opt.out, quant_param_json_text(d, model_type, tp));
    fmt::print(
        "wrote {}: quant-param JSON for tp {} (ranks 0..{} listed), {} layers, model_type {}; "
        "K and V share one scale per layer: max(k, v)\n",
        opt.out, tp, tp - 1, d.num_layers, model_type.empty() ? "null (no --model)" : model_type);
  } else if (opt.to == "modelopt") {
    write_scale_tensors(opt.out, d, ScaleNaming::kModelopt);
    fmt::print(
        "wrote {}: ModelOpt tensors (model.layers.N.self_attn.k_proj.k_scale / "
        "v_proj.v_scale, [1] float32), {} layers; scales as calibrated (no >= 1.0 clamp)\n",
        opt.out, d.num_layers);
  } else if (!opt.model) {  // vllm-checkpoint, the tensors alone
    write_scale_tensors(opt.out, d, ScaleNaming::kVllm);
    fmt::print(
        "wrote {}: vLLM tensors (model.layers.N.self_attn.k_scale / v_scale, {} float32), {} "
        "layers (without --model: no config.json; vLLM needs its kv_cache_scheme too)\n",
        opt.out, d.quant_type == QuantType::kPerHead ? fmt::format("[{}]", d.num_head) : "[1]",
        d.num_layers);
  } else {
    const CheckpointWritten w = write_vllm_checkpoint(opt.out, *opt.model, d);
    fmt::print("wrote {}: vLLM tensors (model.layers.N.self_attn.k_scale / v_scale)\n", w.tensors);
    if (!w.index.empty()) {
      fmt::print("wrote {}: {}'s index, the scale tensors mapped to {}\n", w.index, *opt.model,
                 fs::path(w.tensors).filename().string());
    }
    fmt::print(
        "wrote {}: {}'s config.json with quantization_config.kv_cache_scheme strategy "
        "\"{}\"{}\n",
        w.config, *opt.model, w.strategy,
        w.new_quantization_config ? " (a compressed-tensors quantization_config added)" : "");
    fmt::print("copy or link the model's weights and tokenizer into {} to serve it\n", opt.out);
  }
}

}  // namespace

void add_convert(CLI::App& app) {
  auto opt = std::make_shared<ConvertOptions>();
  CLI::App* cmd = app.add_subcommand(
      "convert", "Rewrite KV scales in another engine's format (docs/FORMATS.md)");
  cmd->add_option("in", opt->in,
                  "Scales to read: kv_cache_calib.json, quant-param JSON, .safetensors of scale "
                  "tensors, or a model folder carrying them")
      ->required();
  cmd->add_option("out", opt->out,
                  "File to write (atomically); a folder for vllm-checkpoint with --model")
      ->required();
  cmd->add_option("--to", opt->to,
                  "lightllm (one column per KV head), lightllm-rank-layout (LightLLM's per-rank "
                  "layout for --tp ranks), vllm-checkpoint, quant-param-json, modelopt")
      ->required();
  cmd->add_option("--tp", opt->tp,
                  "Tensor-parallel ranks: of the per-rank layout, or listed in a quant-param "
                  "JSON (default 1)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--num-kv-heads", opt->num_kv_heads,
                  "The model's KV heads, to read a per-rank input or a format without heads "
                  "(default: --model's)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--model", opt->model,
                  "Model folder: its config.json gives KV heads, layers, architectures and "
                  "model_type; with --to vllm-checkpoint, the folder whose config OUT copies");
  cmd->add_option("--reduce", opt->reduce,
                  "max: per_head scales become per_tensor, each layer's max over its KV heads "
                  "(the per-layer formats need it; with lightllm or vllm-checkpoint it writes a "
                  "per_tensor file, for fp8-per-tensor), and quant-param ranks that disagree "
                  "are merged by their max");
  cmd->add_flag("--drop-q-scales", opt->drop_q_scales,
                "Write to a format without static Q scales even when the input has them");
  cmd->callback([opt]() { run_convert(*opt); });
}

}  // namespace fp8kv::cli
