"""carrot's configuration: the CARROT setting as immutable objects, and carrot-supervisor's options.

- `schema`: the objects (`CarrotConfig`, `QueueConfig`, `BrokerConfig`) the rest of carrot reads;
- `parse`: the raw CARROT dict -> those objects plus every problem, with a check id each;
- `options`: each supervisor option declared once (flag, CARROT key, default, help);
- `secrets`: a setting's value shown with its passwords masked.

`get_config()` is what carrot's code calls. Nothing here imports Django models or pika.
"""
from carrot.config.parse import (E_BAD_BROKER, E_BAD_VALUE, E_DUPLICATE_QUEUE, E_NOT_A_DICT, E_NOT_IMPORTABLE,
                                 E_UNKNOWN_KEY, clear_config_cache, config_from_settings, get_config,
                                 parse_config)
from carrot.config.schema import (CLASSIC, DEFAULT_BROKER, DEFAULT_MAX_PRIORITY, DEFAULT_QUEUE, QUEUE_TYPES, QUORUM,
                                  BrokerConfig, CarrotConfig, ConfigProblem, Node, QueueConfig)

__all__ = ['get_config', 'parse_config', 'config_from_settings', 'clear_config_cache', 'CarrotConfig',
           'QueueConfig', 'BrokerConfig', 'ConfigProblem', 'Node', 'DEFAULT_BROKER', 'DEFAULT_QUEUE',
           'DEFAULT_MAX_PRIORITY', 'CLASSIC', 'QUORUM', 'QUEUE_TYPES', 'E_NOT_A_DICT', 'E_UNKNOWN_KEY',
           'E_BAD_VALUE', 'E_DUPLICATE_QUEUE', 'E_BAD_BROKER', 'E_NOT_IMPORTABLE']
