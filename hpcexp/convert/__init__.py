"""Dockerfile -> Apptainer recipe, as parser -> model -> writer, with a fidelity report.

``dockerfile`` tokenizes; ``interpret`` (with ``variables``, ``staging``, ``imageconfig``
and ``context``) turns instructions into the typed recipe of ``model``; ``writer`` renders
it; ``report`` holds the notes and the :class:`Conversion` result; ``bridge`` is the one
door to spython; ``baseenv`` reads a base image's environment. The public entry points
(``convert``, ``Conversion``, ``BaseResolution``, ...) are imported from
``hpcexp.convert.recipe``. Nothing is re-exported here, on purpose: ``import
hpcexp.convert.baseenv`` (the builder does) must not load the whole converter.
"""
