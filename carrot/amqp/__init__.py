"""Everything that talks AMQP, and nothing else: connections, queue declarations, the confirmed
publisher, the consume session, the wire format and the pika adaptations.

The bottom floor of carrot: it imports no model, no processor and no publishing logic. What the layers
above tell it about a delivery is a `Disposition` (carrot.amqp.disposition).
"""
