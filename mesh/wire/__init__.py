"""What crosses a process or machine boundary, typed and versioned.

    framing    length-prefixed msgpack frames: a sans-I/O decoder, trio and blocking adapters
    inference  the request/event vocabulary the API, router, proxy and workers all speak
    state      the gossiped NodeState and its signed envelope
"""
