"""Types for init arguments that take plain data: never a class to import or build.

jsonargparse treats a value of an ``Any``-typed argument that looks like ``{class_path: ...}``
(or a string that parses to one) as a class to import and instantiate. Arguments that hold
configuration data (a backbone's config kwargs, run tags) are typed with :data:`PlainValue`
instead, so such a value stays a plain mapping and nothing is imported.
"""

from typing import Union

#: A scalar of a config file.
PlainScalar = Union[bool, int, float, str, None]  # noqa: UP007 - jsonargparse resolves Union
#: A config value: a scalar, a list of scalars, or a mapping of those (two levels deep, enough
#: for a transformers config such as ``rope_scaling: {rope_type: linear, factor: 2.0}``).
PlainValue = Union[  # noqa: UP007
    PlainScalar,
    list[PlainScalar],
    dict[str, Union[PlainScalar, list[PlainScalar]]],  # noqa: UP007
]
