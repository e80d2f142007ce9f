"""The README's "Your own NIfTI data" commands, run as written on a dataset shaped exactly like
MSD Task06_Lung (issue 21 item 14): prepare the source, train on it and an MRI target whose
tumour label is named otherwise, predict its test images.

Task06_Lung as downloaded: `dataset.json` in MSD's dialect ("labels" {"0": "background", "1":
"cancer"}, "modality", "training" [{"image", "label"}], "test" a list of paths), images without
nnU-Net's `_0000`, and macOS AppleDouble `._*` files beside the real ones. Here its cases are the
tiny phantom CTs (tests/conftest.py `tiny_data`), the target the phantom T2w set (label "tumor");
sizes and steps are the tiny ones (tests/tiny_runs.py), the rest of each command is the README's.
"""

import json
import os
import re
import shlex
import shutil

from absl import flags
from ml_collections import config_flags
import nibabel as nib
import pytest

from cmedl_jax import predict
from cmedl_jax import train
from configs import cmedl
from data_prep import prepare
import tiny_runs

README = tiny_runs.ROOT / 'README.md'
TINY_SIZES = {'--spacing': '12', '--size': '32'}  # tiny_runs: 12 mm, configs/tiny.py: 32 px.


def readme_own_data_commands():
  """{program: argv} of the commands in the README's "Your own NIfTI data" section."""
  text = README.read_text()
  section = text.split('\n## Your own NIfTI data\n', 1)[1].split('\n## ', 1)[0]
  commands = {}
  for block in re.findall(r'```\n(.*?)```', section, re.S):
    for line in block.replace('\\\n', ' ').splitlines():
      if line.strip():
        python, dash_m, program, *argv = shlex.split(line)
        assert (python, dash_m) == ('python', '-m'), line
        commands[program] = argv
  assert sorted(commands) == ['cmedl_jax.main', 'cmedl_jax.predict', 'data_prep.prepare']
  return commands


def write_task06_like(phantom_dir, out_dir):
  """A copy of a phantom CT set (nnU-Net layout) in Task06_Lung's shape; returns the test ids."""
  names = {}  # phantom case id -> lung_NNN
  for split in ('Tr', 'Ts'):
    os.makedirs(out_dir / f'images{split}')
    for path in sorted((phantom_dir / f'images{split}').glob('*_0000.nii.gz')):
      case = names.setdefault(path.name[: -len('_0000.nii.gz')], f'lung_{len(names) + 1:03d}')
      shutil.copy(path, out_dir / f'images{split}' / f'{case}.nii.gz')
  os.makedirs(out_dir / 'labelsTr')
  for path in sorted((phantom_dir / 'labelsTr').glob('*.nii.gz')):
    shutil.copy(path, out_dir / 'labelsTr' / f'{names[path.name[: -len(".nii.gz")]]}.nii.gz')
  training = sorted(p.name for p in (out_dir / 'labelsTr').iterdir())
  test = sorted(p.name for p in (out_dir / 'imagesTs').iterdir())
  meta = {
    'name': 'Lung',
    'description': 'Lung and cancer segmentation',
    'tensorImageSize': '3D',
    'modality': {'0': 'CT'},
    'labels': {'0': 'background', '1': 'cancer'},
    'numTraining': len(training),
    'numTest': len(test),
    'training': [{'image': f'./imagesTr/{n}', 'label': f'./labelsTr/{n}'} for n in training],
    'test': [f'./imagesTs/{n}' for n in test],
  }
  (out_dir / 'dataset.json').write_text(json.dumps(meta, indent=4))
  for folder, name in [('imagesTr', training[0]), ('labelsTr', training[0]), ('imagesTs', test[0])]:
    (out_dir / folder / f'._{name}').write_bytes(b'\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X')
  (out_dir / '._dataset.json').write_bytes(b'\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X')
  return [n[: -len('.nii.gz')] for n in test]


def on_tmp(argv, tmp_path):
  """The README's paths under tmp_path: /data/X -> tmp_path/data/X (relative ones resolve
  there, the working directory); tiny in-plane spacing and size."""
  argv = [a.replace('/data/', f'{tmp_path}/data/') for a in argv]
  return [TINY_SIZES.get(prev, a) for prev, a in zip([None] + argv, argv)]


def parse_main_flags(argv):
  """(config, workdir) of the trainer's flags, parsed as cmedl_jax/main.py defines them."""
  values = flags.FlagValues()
  flags.DEFINE_string('workdir', None, 'Run directory.', flag_values=values)
  config_flags.DEFINE_config_file('config', None, flag_values=values, sys_argv=argv)
  values(argv)
  return values.config, values.workdir


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # ml_collections' loader.
def test_the_readme_own_data_commands_run_on_a_task06_lung_shaped_dataset(
  tiny_data, tmp_path, monkeypatch, capsys
):
  commands = readme_own_data_commands()
  prep = commands['data_prep.prepare']
  # The README's preparation is the one its training asks for (configs/cmedl.py's sizes).
  default = cmedl.get_config()
  assert float(prep[prep.index('--spacing') + 1]) == default.data.spacing_mm
  assert int(prep[prep.index('--size') + 1]) == default.data.image_size

  test_ids = write_task06_like(tiny_data / 'raw' / 'thorax_ct', tmp_path / 'data' / 'Task06_Lung')
  shutil.copytree(tiny_data / 'raw' / 'thorax_t2w', tmp_path / 'data' / 'my_t2w')
  monkeypatch.chdir(tmp_path)
  assert prepare.main(on_tmp(prep, tmp_path) + ['--no-progress']) == 0, capsys.readouterr()
  assert 'classes (2): background, cancer' in capsys.readouterr().out

  # The README's training flags, on the tiny config with the tiny runs' sizes and steps.
  train_argv = on_tmp(commands['cmedl_jax.main'], tmp_path)
  assert train_argv[0] == '--config=configs/cmedl.py'
  tiny = [
    f'--config.{k}={v}'
    for k, v in tiny_runs.overrides(tmp_path).items()
    if not k.startswith(('data.source.', 'data.target.'))
  ]
  config, workdir = parse_main_flags(
    ['main', f'--config={tiny_runs.ROOT}/configs/tiny.py:unet,cyclegan'] + train_argv[1:] + tiny
  )
  manifest = tmp_path / 'data' / 'prepared' / 'lung_ct' / prepare.MANIFEST
  prepared_at = manifest.stat().st_mtime_ns
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == tiny_runs.NUM_STEPS
  # The source prepared by the README's command was used as it is; the target prepared.
  assert manifest.stat().st_mtime_ns == prepared_at
  assert sorted(os.listdir(tmp_path / 'data' / 'prepared')) == ['lung_ct', 'my_t2w']

  assert predict.main(on_tmp(commands['cmedl_jax.predict'], tmp_path)) == 0
  written = sorted(os.listdir(tmp_path / 'runs' / 'lung' / 'pred'))
  assert written == [f'{case}.nii.gz' for case in test_ids]
  image = nib.load(tmp_path / 'data' / 'Task06_Lung' / 'imagesTs' / written[0])
  assert nib.load(tmp_path / 'runs' / 'lung' / 'pred' / written[0]).shape == image.shape
