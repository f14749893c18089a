"""Stand-in for dom0's ``XenAPIPlugin`` (xen-api python3/examples/XenAPIPlugin.py), the
protocol of XEN-NOTES.md §3 exactly: ``dispatch`` needs ``len(argv) == 2``, parses ``argv[1]``
(an XML-RPC methodCall: method = fn, params = [session ref, struct of string args]), calls
``fn(session, args)`` with a ``XenAPI`` session to the local xapi socket whose ``_session`` is the
caller's session, prints one methodResponse and returns (exit 0).

The one difference from dom0: the socket is ``$TESTXEN_XAPI_SOCKET`` when set (the XAPI
stand-in, ``testxen/xapi.py``), else xapi's ``/var/lib/xcp/xapi``.
"""
import os
import sys
import xmlrpc.client as xmlrpclib

import XenAPI


class Failure(Exception):
    """Provide compatibility with plugins written against XenServer 5.5 API"""

    def __init__(self, code, params):
        Exception.__init__(self)
        self.params = [code] + params

    def __str__(self):
        return str(self.params)


def success_message(result):
    rpcparams = {'Status': 'Success', 'Value': result}
    return xmlrpclib.dumps((rpcparams, ), '', True)


def failure_message(description):
    rpcparams = {'Status': 'Failure', 'ErrorDescription': description}
    return xmlrpclib.dumps((rpcparams, ), '', True)


def xapi_local():
    path = os.environ.get("TESTXEN_XAPI_SOCKET")
    if not path:
        return XenAPI.xapi_local()
    if "_" in path:
        # XenAPI's UDSHTTPConnection turns every "_" of the host name into "/"
        raise Exception("TESTXEN_XAPI_SOCKET %r must not contain '_'" % path)
    return XenAPI.Session("http://%s/" % path.replace("/", "_"), transport=XenAPI.UDSTransport())


def dispatch(fn_table):
    if len(sys.argv) != 2:
        raise Exception("Incorrect number of commandline arguments")
    params, methodname = xmlrpclib.loads(sys.argv[1])
    session_id = params[0]
    args = params[1]
    if methodname in fn_table:
        x = xapi_local()
        x._session = session_id
        try:
            result = fn_table[methodname](x, args)
            print(success_message(result))
        except SystemExit:
            # SystemExit should not be caught, as it is handled elsewhere in the plugin system.
            raise
        except Failure as e:
            print(failure_message(e.params))
        except Exception as e:
            print(failure_message(['XENAPI_PLUGIN_FAILURE',
                                   methodname, e.__class__.__name__, str(e)]))
    else:
        print(failure_message(['UNKNOWN_XENAPI_PLUGIN_FUNCTION', methodname]))
