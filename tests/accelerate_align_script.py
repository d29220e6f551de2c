"""Runs `safetext.align` under `accelerate launch`; used by the multi-process test in test_alignment.py.

Usage: accelerate launch ... accelerate_align_script.py MODEL UNSAFE_FILE SAFE_FILE OUTPUT_DIR CONFIG_JSON
where CONFIG_JSON holds `AlignmentConfig` settings.
"""

import json
import sys

from safetext.alignment import align
from safetext.config import AlignmentConfig
from safetext.prompts import read_prompts


def main(argv):
    model, unsafe_file, safe_file, output_dir, config_json = argv
    align(
        model,
        {"unsafe": read_prompts(unsafe_file)},
        {"safe": read_prompts(safe_file)},
        output_dir,
        AlignmentConfig.from_dict(json.loads(config_json)),
        show_progress=False,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
