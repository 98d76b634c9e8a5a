"""What the benchmark scripts share: a default config with dotted overrides, and the results written as
JSON (with the machine and the command) and as a Markdown table."""
import json
import os
import platform
import sys
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model_zoo import config as config_lib  # pylint: disable=wrong-import-position


def load(file: str, overrides: dict):
  """configs/<file> with `overrides` ({'optimizer.learning_rate': 1e-4, ...}; each key must exist)."""
  config = config_lib.load(os.path.join(ROOT, 'configs', file))
  config.update_from_flattened_dict(overrides)
  return config


def write(output: str, rows: dict, table: str):
  """<output>.json (the rows, the machine, the command) and <output>.md (the table); printed too."""
  out = {'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
                    f'{jax.devices()[0].platform}', 'jax': jax.__version__, 'date': time.strftime('%Y-%m-%d'),
         'command': f'python {os.path.relpath(sys.argv[0], ROOT)} ' + ' '.join(sys.argv[1:]), 'rows': rows}
  with open(output + '.json', 'w') as f:
    json.dump(out, f, indent=2)
  with open(output + '.md', 'w') as f:
    f.write(table + '\n')
  print(table, flush=True)
