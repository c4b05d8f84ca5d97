"""Optional integrations with other libraries.

Each submodule imports the library it integrates and needs its extra installed
(``moe_router.integrations.transformers`` needs ``pip install moe_router[hf]``). Importing
``moe_router`` itself never imports any of them.
"""
