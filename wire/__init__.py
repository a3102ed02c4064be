"""The wire contract: typed shapes of everything that crosses a process or the network.

Pure: pydantic models and enums, no I/O, and no import of any other package of this project.
The agent, the module, the cloud side and the simulator all read and write through it.
"""
