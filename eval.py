"""Evaluates a trained workdir.

  python eval.py --config=configs/cnn.py --workdir=runs/cnn [--step=N]     # eval.json and PNG plots
  python eval.py --config=configs/gpt.py --workdir=runs/gpt --mode=sample --prompt="The with statement"
  python eval.py --config=configs/transformer.py --workdir=runs/mt --mode=translate --input="three hundred and five"
  python eval.py --config=configs/bert_finetune.py --workdir=runs/cls --mode=export   # LoRA merged, safetensors
  python eval.py --config=configs/cnn.py --workdir=runs/cnn --mode=export --format=stablehlo --output=DIR
  python eval.py --config=configs/gpt.py --workdir=runs/gpt --quantize=int8     # eval-int8.json, any --mode
  python eval.py --config=configs/cnn.py --workdir=runs/cnn --mode=interpret   # interpret.json, interpret/*.png
"""
from absl import flags

from model_zoo import cli

STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to use; default the latest.')
MODE = flags.DEFINE_enum('mode', 'eval', ['eval', 'sample', 'translate', 'export', 'interpret'],
                         'eval: metrics on the eval split; sample: continue --prompt (language models); '
                         'translate: translate --input (translation models); export: the parameters for '
                         'inference, LoRA merged, to --output; interpret: attributions, attention maps or '
                         'latent views, and their faithfulness (interpret.json, interpret/).')
METHOD = flags.DEFINE_enum('method', None, ['integrated_gradients', 'smoothgrad', 'gradient_x_input', 'occlusion',
                                            'attention', 'latents'],
                           'What --mode=interpret draws; default the task\'s first (integrated_gradients for '
                           'classifiers, attention for translation and language models, latents for the '
                           'autoencoder and VAE). Options in config.interpret.')
OUTPUT = flags.DEFINE_string('output', None, 'Directory for --mode=export; default <workdir>/export.')
FORMAT = flags.DEFINE_enum('format', 'safetensors', ['safetensors', 'stablehlo', 'savedmodel', 'onnx'],
                           'What --mode=export writes: safetensors (the weights, LoRA merged), stablehlo (each '
                           'inference function as a serialized jax.export program with a symbolic batch, its '
                           'weights, signature.json and reference_io.npz), savedmodel (a TensorFlow SavedModel '
                           'through jax2tf, pip install -e .[tf]) or onnx (through jax2onnx, checked with '
                           'onnxruntime; pip install -e .[onnx] && pip install --no-deps jax2onnx==0.17.1); the '
                           'last three verify themselves before they are kept.')
INPUT = flags.DEFINE_multi_string('input', [], 'Text(s) to translate with --mode=translate, or to interpret with '
                                   '--mode=interpret (text models); repeat for several.')
PROMPT = flags.DEFINE_multi_string('prompt', ['The '], 'Prompt(s) for --mode=sample; repeat for several; "" '
                                   'samples from the start of a document.')
NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Continuations per prompt.')
MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 100, 'Tokens to generate per continuation.')
TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 = greedy.')
TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample from the k most likely tokens; 0 = all.')
TOP_P = flags.DEFINE_float('top_p', 0.95, 'Nucleus sampling mass; 1 = off.')
SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
QUANTIZE = flags.DEFINE_enum('quantize', None, ['int8', 'int8_dynamic', 'int4', 'int4_gptq'],
                             'Post-training quantization of the trained weights before any --mode: int8 weights, '
                             'int8 weights and inputs, int4 weights rounded to nearest, or by GPTQ. Saved in '
                             '<workdir>/quantized/<SCHEME>/ and reused; --mode=eval writes eval-<SCHEME>.json.')


def main(config, workdir):
  from model_zoo.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  if MODE.value == 'sample':
    evaluate.sample(config, workdir, PROMPT.value, step=STEP.value, seed=SEED.value,
                    max_new_tokens=MAX_NEW_TOKENS.value, temperature=TEMPERATURE.value, top_k=TOP_K.value,
                    top_p=TOP_P.value, num_samples=NUM_SAMPLES.value, quantize=QUANTIZE.value)
  elif MODE.value == 'translate':
    evaluate.translate(config, workdir, INPUT.value, step=STEP.value, quantize=QUANTIZE.value)
  elif MODE.value == 'interpret':
    evaluate.interpret(config, workdir, METHOD.value, INPUT.value, step=STEP.value, quantize=QUANTIZE.value)
  elif MODE.value == 'export':
    evaluate.export(config, workdir, OUTPUT.value, step=STEP.value, quantize=QUANTIZE.value, format=FORMAT.value)
  else:
    evaluate.evaluate(config, workdir, STEP.value, quantize=QUANTIZE.value)


if __name__ == '__main__':
  cli.run(main)
