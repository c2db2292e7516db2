"""The conformance kit of the node role, `conntrack-conformance`: pointed at a running gateway
node of any make, it judges from outside every rule a node must keep (conformance/rules.py)."""
