"""Two processes on 127.0.0.1 (jax.distributed, gloo collectives), 4 CPU devices each, with parameters sharded
over both processes' devices (mesh.fsdp=8, so no process holds a whole kernel): fine-tuning reads each process's
shards of the trained parameters alone (a distillation teacher is read the same way,
finetune.CheckpointVariables), exports gather them for process 0 to write,
and sampling and translation (eval.py's BLEU too) split their inputs over the processes; each gives what one
process of 8 devices gives."""
import json
import os

import numpy as np
import pytest

from helpers import read_metrics, run_cli, two_processes, without_gloo
from test_multihost import GPT

FSDP = ['--config.mesh.fsdp=8', '--config.mesh.data=1']   # each kernel split over both processes' devices
SMALL = [*GPT, *FSDP, '--config.num_train_steps=4', '--config.eval_every_steps=4',
         '--config.model.positional=learned', '--config.model.attention_bias=True']   # GPT-2's layout: hf/ too


@pytest.fixture(scope='module')
def gpt(tmp_path_factory):
  """A GPT-2-layout GPT trained 4 steps by one process of 8 devices, its kernels split 8 ways."""
  workdir = str(tmp_path_factory.mktemp('gpt') / 'run')
  run_cli('train.py', *SMALL, f'--workdir={workdir}', devices=8, check=True)
  return workdir


def test_two_processes_fine_tune_with_parameters_spanning_both_like_one(tmp_path, gpt):
  single, multi = str(tmp_path / 'single'), str(tmp_path / 'multi')
  tune = [*SMALL, f'--config.init_from={gpt}']
  proc = run_cli('train.py', *tune, f'--workdir={single}', devices=8, check=True)
  assert 'arrays restored; new: no head' in proc.stdout
  outs = two_processes(multi, tune)
  assert all('arrays restored; new: no head' in out for out in outs), outs
  a, b = read_metrics(single), read_metrics(multi)
  assert [(r['step'], r['split']) for r in a] == [(r['step'], r['split']) for r in b]
  for x, y in zip(a, b):
    for k in set(x) - {'step', 'split'}:
      np.testing.assert_allclose(x[k], y[k], rtol=2e-5, atol=1e-6, err_msg=f'{k} at step {x["step"]}')


def test_two_processes_export_parameters_spanning_both_like_one(tmp_path, gpt):
  """safetensors and Hugging Face's GPT-2 (hf/) exports, then StableHLO: process 0 writes what it gathered."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  run_cli('eval.py', *SMALL, f'--workdir={gpt}', '--mode=export', f'--output={tmp_path}/one', devices=8, check=True)
  outs = two_processes(gpt, [*SMALL, '--mode=export', f'--output={tmp_path}/two'], script='eval.py')
  assert all('exported step 4' in out for out in outs), outs
  for name in ('model.safetensors', 'hf/model.safetensors'):
    one, two = load_file(str(tmp_path / 'one' / name)), load_file(str(tmp_path / 'two' / name))
    assert sorted(one) == sorted(two) and len(one) > 5
    for k in one:
      np.testing.assert_array_equal(one[k], two[k], err_msg=k)
  assert sorted(os.listdir(tmp_path / 'one')) == sorted(os.listdir(tmp_path / 'two'))
  # StableHLO (lowered and verified by process 0 alone): the weights are one process's, whole.
  outs = two_processes(gpt, [*SMALL, '--mode=export', '--format=stablehlo', f'--output={tmp_path}/hlo'],
                       script='eval.py')
  assert all('exported step 4' in out for out in outs) and 'verified on' in outs[0], outs
  one, hlo = load_file(str(tmp_path / 'one' / 'model.safetensors')), load_file(str(tmp_path / 'hlo' / 'weights.safetensors'))
  assert len(hlo) > 5 and all(k.startswith('params/') and k[len('params/'):] in one for k in hlo), sorted(hlo)
  for k in hlo:
    np.testing.assert_array_equal(hlo[k], one[k[len('params/'):]], err_msg=k)


def test_two_processes_sample_and_translate_like_one(tmp_path, gpt):
  """Prompts and sources held by both processes are split over the mesh (fsdp=8: the parameters span both);
  each process decodes its share, and the outputs are one process's. (--mode=translate calls the same
  task.translate with the same rows as eval.py's BLEU does.)"""
  mt = str(tmp_path / 'mt')
  transformer = ['--config=configs/transformer.py', '--config.model.num_encoder_layers=1',
                 '--config.model.num_decoder_layers=1', '--config.model.d_model=32', '--config.model.num_heads=2',
                 '--config.model.d_ff=64', '--config.dataset.train_examples=400', '--config.dataset.vocab_size=296',
                 '--config.batch_size=16', '--config.num_train_steps=4', '--config.eval_every_steps=4',
                 '--config.optimizer.warmup_steps=1', *FSDP]
  run_cli('train.py', *transformer, f'--workdir={mt}', devices=8, check=True)
  sample = [*SMALL, '--mode=sample', '--prompt=The ', '--prompt=import os', '--prompt=', '--num_samples=3',
            '--max_new_tokens=12', '--temperature=1.0', '--seed=3']
  one = run_cli('eval.py', *sample, f'--workdir={gpt}', devices=8, check=True).stdout
  outs = [without_gloo(out) for out in two_processes(gpt, sample, script='eval.py')]
  assert one.count('--- prompt:') == 9 and outs[0] == one and '--- prompt' not in outs[1]
  # Translation, as eval.py's BLEU runs it: each process decodes its share of each batch of the split's sources.
  evaluate = [*transformer, '--config.decode.splits=validation', '--config.decode.max_len=12',
              '--config.decode.beam_size=2', '--config.batch_size=512']   # 2 batches of 1,000 sources, 2 beams
  run_cli('eval.py', *evaluate, f'--workdir={mt}', devices=8, check=True)
  tsv = os.path.join(mt, 'translations-validation.tsv')
  with open(tsv) as f, open(os.path.join(mt, 'eval.json')) as g:
    want_rows, want = f.read(), json.load(g)
  os.remove(tsv)
  two_processes(mt, evaluate, script='eval.py')
  with open(tsv) as f, open(os.path.join(mt, 'eval.json')) as g:
    got_rows, got = f.read(), json.load(g)
  hypotheses = [row.split('\t')[2] for row in want_rows.splitlines()[1:]]
  assert got_rows == want_rows and len(hypotheses) > 900 and len(set(hypotheses)) > 3   # rows that differ
  assert got['bleu'] == want['bleu'] and got['exact_match'] == want['exact_match'], (got, want)
