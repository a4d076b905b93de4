"""The built-in synthetic corpus (``tsd-data synth``): drawn faces (``face_render``) speaking espeak-ng sentences
(``corpus``), in the LRS3 layout, with ground-truth visemes and mouth shapes."""
