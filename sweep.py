"""Trains one config at several points, each into its own work directory (model_zoo/training/sweep.py).

  python sweep.py --config=configs/mlp.py --workdir=runs/mlp_sweep \
      --sweep='optimizer.learning_rate=1e-3,3e-3 batch_size=64,128'       # a grid: 4 points, one after another
  python sweep.py --config=configs/gpt.py --workdir=runs/gpt_sweep --parallel=8   # the config's sweep(), one per GPU
  python sweep.py --config=configs/mlp.py --workdir=runs/mlp_sweep --sweep=... --print_commands  # for a cluster

Overrides given as --config.a.b=value apply to every point. Running the same command again skips finished
points and resumes unfinished ones. Ends with <workdir>/sweep.json, a table, sweep.png and best_config.json.
"""
import sys

from absl import flags

from model_zoo import cli
from model_zoo.errors import UserError

SWEEP = flags.DEFINE_string('sweep', None, "A grid, 'key=v1,v2 key2=v3,v4' (its product); default the config "
                            "file's sweep().")
PARALLEL = flags.DEFINE_integer('parallel', 1, 'Points trained at once; on a machine with GPUs, one per GPU '
                                '(CUDA_VISIBLE_DEVICES), at most their number.')
METRIC = flags.DEFINE_string('metric', '', 'The eval metric that picks the best point; default loss.')
GOAL = flags.DEFINE_string('goal', '', "'max' or 'min'; default max for accuracy-like metrics, min otherwise.")
PRINT_COMMANDS = flags.DEFINE_bool('print_commands', False, 'Write commands.sh and a SLURM array script '
                                   '(sweep.sbatch) into --workdir instead of training.')


def main(config, workdir):
  from model_zoo.training import sweep  # pylint: disable=g-import-not-at-top
  spec = cli.config_spec()
  base = [a for a in sys.argv[1:] if a.startswith(('--config.', '--noconfig.'))]
  points = sweep.parse_grid(SWEEP.value) if SWEEP.value else sweep.config_points(spec)
  if points is None:
    raise UserError(f'{spec.partition(":")[0]} defines no sweep() and --sweep is not given: give a grid, '
                        f"e.g. --sweep='optimizer.learning_rate=1e-3,3e-3 seed=0,1'")
  run = sweep.Sweep(spec, workdir if cli.WORKDIR.value else workdir + '_sweep', config, base, points,
                    METRIC.value, GOAL.value)
  if PRINT_COMMANDS.value:
    sh, _ = run.print_commands()
    print(sh, end='')
    print(f'wrote {run.directory}/commands.sh and {run.directory}/sweep.sbatch (sbatch it); run this command '
          'again without --print_commands to gather sweep.json')
    return
  rows = run.run(PARALLEL.value)
  print(run.table(rows))
  best = run.best(rows)
  print(f'{run.directory}/sweep.json' + (f': best {best["name"]} ({run.metric} {best["metrics"][run.metric]:.4g}), '
                                         f'its config in {run.directory}/best_config.json' if best else ''))
  failed = [r['name'] for r in rows if r['status'] != 'done']
  if failed:
    raise UserError(f'{len(failed)} of {len(rows)} points did not finish ({", ".join(failed)}): see '
                        f'{run.directory}/logs/<point>.log, then run the same command to resume them')


if __name__ == '__main__':
  cli.run(main)
