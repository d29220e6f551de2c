"""MiniWorld: a small synthetic world on which the project trains, aligns and measures a real text-to-image model.

The modules, one concept each:

- `world`: the vocabulary as plain data: object classes, colours, sizes, positions, backgrounds, the attributes
  (the restricted concepts `striped` and `crowned` with their three surface-form groups, and their neighbours).
- `scenes`: the `Scene` a picture shows and `sample_scene`, the world's distribution of scenes.
- `renderer`: `render(scene)`, a deterministic 64x64 RGB picture.
- `captions`: `caption(scene, rng, forms=...)`, the caption grammar.
- `prompt_sets`: the shipped prompt sets (`miniworld-train`, `-heldout`, `-indirect`, `-neighbour`, `-overerasure`,
  `-safe`, and the `miniworld-crowned-*` sets) and how they are generated.
- `detector`: `MiniWorldDetector`, the world's counterpart of NudeNet.

Importing this package imports nothing else; import the module you need.
"""
