"""The Shapes world: procedural videos of coloured shapes and the prompts that describe them.

:mod:`chaid_lab.shapes.world` defines scenes, renders them and samples them; :mod:`chaid_lab.shapes.prompts`
writes a scene as English and reads attribute labels back out of a prompt.
"""
