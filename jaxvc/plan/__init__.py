"""Compile-only planning of TPU pod runs on a CPU machine (``jaxvc plan``): memory, FLOPs, collectives, roofline.

``hardware`` knows the chips and asks libtpu for a slice's abstract devices, ``hlo`` reads collectives from
compiled HLO text, ``planner`` compiles the trainer's real sharded step, ``cli`` is the command.
"""
