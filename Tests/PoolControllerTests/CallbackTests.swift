import Egress
import Foundation
import Hummingbird
import HTTPTypes
import HummingbirdTesting
import Logging
import PoolAPI
import Testing

@testable import PoolController

@Suite("Callback URLs: the address guard")
struct CallbackGuardTests {
    @Test("loopback, private, link-local, metadata and other special addresses are named; public ones are not")
    func classification() throws {
        let special: [(String, String)] = [
            ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"),
            ("172.16.0.1", "private"), ("172.31.255.255", "private"), ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local (cloud metadata)"), ("fe80::1", "link-local"), ("fd00:ec2::254", "unique local (private)"),
            ("100.64.0.1", "carrier-grade NAT"), ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"), ("::ffff:10.0.0.1", "private"), ("::ffff:127.0.0.1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata)"), ("::127.0.0.1", "loopback"), ("::ffff:0:7f00:1", "loopback"),
            ("64:ff9b:1::a9fe:a9fe", "local-use NAT64"), ("fec0::1", "site-local"), ("2002:7f00:1::", "loopback"),
            ("2002:a9fe:a9fe::1", "link-local (cloud metadata)"), ("2001::1", "IETF protocol (Teredo, benchmarking, ORCHID)"),
            ("192.88.99.1", "6to4 relay anycast"), ("3fff::1", "documentation"), ("4000::1", "non-global (outside 2000::/3)"),
        ]
        for (text, kind) in special {
            let address = try #require(IPAddressBytes(text), "\(text)")
            #expect(address.specialUse == kind, "\(text)")
        }
        for text in ["93.184.216.34", "172.32.0.1", "8.8.4.4", "2606:4700::1111", "::ffff:93.184.216.34", "2002:5db8:d822::1"] {
            #expect(try #require(IPAddressBytes(text)).specialUse == nil, "\(text)")
        }
        #expect(IPAddressBytes("10.0.0.256") == nil)
        #expect(IPAddressBytes("example.org") == nil)
    }

    @Test("networks contain exactly their prefix")
    func networks() throws {
        let network = try #require(IPNetwork("10.20.0.0/15"))
        #expect(network.contains(try #require(IPAddressBytes("10.21.255.255"))))
        #expect(!network.contains(try #require(IPAddressBytes("10.22.0.0"))))
        #expect(!network.contains(try #require(IPAddressBytes("::1"))))
        #expect(try #require(IPNetwork("::1")).contains(try #require(IPAddressBytes("::1"))))
        #expect(IPNetwork("10.0.0.0/33") == nil)
        #expect(IPNetwork("fd00::/129") == nil)
        for text in ["", "/", "10.0.0.0/", "/8", "10.0.0.0/+8"] { #expect(IPNetwork(text) == nil, "\(text)") }
    }
}

/// A callback server on loopback: `/params` answers start parameters,
/// `/hop/N` chains N more hops, and the others misbehave in one way each.
private func json(_ text: String, type: String = "application/json") -> Response {
    Response(status: .ok, headers: [.contentType: type], body: .init(byteBuffer: ByteBuffer(string: text)))
}

private func parameters(callback: String = "", image: String = "from-callback") -> String {
    ##"{"image": {"name": "\##(image)", "url": "http://images.test/\##(image).qcow2", "container_format": "bare", "disk_format": "qcow2"}, "callback_url": "\##(callback)", "ssh_keys": ["ssh-ed25519 AAAA cb"], "post_create": ["#!/bin/sh", "echo hi"]}"##
}

func callbackRouter() -> Router<BasicRequestContext> {
    let router = Router(context: BasicRequestContext.self)
    router.get("params") { _, _ in json(parameters()) }
    router.get("hop/:n") { request, context in
        let n = Int(context.parameters.get("n") ?? "") ?? 0
        let host = request.head.authority ?? ""
        return json(n <= 1 ? parameters(image: "end-of-chain") : parameters(callback: "http://\(host)/hop/\(n - 1)"))
    }
    router.get("html") { _, _ in json("<html></html>", type: "text/html") }
    router.get("big") { _, _ in json(parameters(image: String(repeating: "x", count: 4096))) }
    router.get("garbage") { _, _ in json("hello") }
    router.get("wrong-shape") { _, _ in json(#"{"image": "debian"}"#) }
    router.get("slow") { _, _ in
        try await Task.sleep(for: .seconds(5))
        return json(parameters())
    }
    router.get("trickle") { _, _ in
        // The headers at once, then the body a little at a time, for 6 s.
        Response(
            status: .ok, headers: [.contentType: "application/json"],
            body: ResponseBody { writer in
                for _ in 0..<20 {
                    try await writer.write(ByteBuffer(string: " "))
                    try await Task.sleep(for: .milliseconds(300))
                }
                try await writer.write(ByteBuffer(string: parameters()))
                try await writer.finish(nil)
            })
    }
    router.get("redirect") { _, _ in Response(status: .found, headers: [.location: "/params"]) }
    router.get("missing") { _, _ in Response(status: .notFound) }
    return router
}

/// Runs `body` with the callback server's base URL (`http://127.0.0.1:PORT`).
func withCallbackServer(_ body: @Sendable @escaping (String) async throws -> Void) async throws {
    let app = Application(router: callbackRouter(), configuration: .init(address: .hostname("127.0.0.1", port: 0)))
    try await app.test(.live) { client in
        try await body("http://127.0.0.1:\(try #require(client.port))")
    }
}

@Suite("Callback URLs: fetched by the pool over loopback")
struct CallbackFetchTests {
    static func limits(allowLoopback: Bool, timeoutSeconds: Int = 3) -> PoolConfiguration.CallbackLimits {
        var limits = PoolConfiguration.CallbackLimits()
        // The whole chain's deadline: the slow and trickling callbacks do
        // not fit in 3 s; the 7-hop chain gets more, for a loaded machine.
        limits.timeoutSeconds = timeoutSeconds
        limits.maxBytes = 1024
        limits.maxHops = 7
        limits.allow = allowLoopback ? ["127.0.0.0/8"] : []
        limits.ports = []  // the test server's port is any free one
        return limits
    }

    @Test("an allowed callback's start parameters are returned, chains are followed up to 7 hops")
    func follows() async throws {
        try await withCallbackServer { base in
            let fetcher = CallbackFetcher(limits: Self.limits(allowLoopback: true, timeoutSeconds: 30))
            defer { Task { await fetcher.shutdown() } }
            let direct = try await fetcher.startParameters(from: "\(base)/params")
            #expect(direct.image.name == "from-callback")
            #expect(direct.sshKeys == ["ssh-ed25519 AAAA cb"])
            #expect(direct.postCreate == ["#!/bin/sh", "echo hi"])
            let chained = try await fetcher.startParameters(from: "\(base)/hop/7")
            #expect(chained.image.name == "end-of-chain")
            #expect(chained.callbackURL == "")
            await #expect(throws: CallbackError(url: "\(base)/hop/1", reason: "the chain is longer than 7 callbacks")) {
                try await fetcher.startParameters(from: "\(base)/hop/8")
            }
        }
    }

    @Test("each misbehaving callback is refused with its reason")
    func refusals() async throws {
        try await withCallbackServer { base in
            let fetcher = CallbackFetcher(limits: Self.limits(allowLoopback: true))
            defer { Task { await fetcher.shutdown() } }
            // The refusals that do not depend on the deadline get a generous one:
            // a loaded machine once took more than 3 s for a loopback 404.
            let patient = CallbackFetcher(limits: Self.limits(allowLoopback: true, timeoutSeconds: 30))
            defer { Task { await patient.shutdown() } }
            let cases: [(String, String, CallbackFetcher)] = [
                ("html", "it answered with Content-Type 'text/html'; callbacks must answer application/json", patient),
                ("big", "the reply is larger than 1024 bytes", patient),
                ("garbage", "the reply is not start parameters: the body is not valid JSON", patient),
                ("wrong-shape", "the reply is not start parameters: field 'image' must be an object", patient),
                ("slow", "no start parameters within 3 s", fetcher),
                ("redirect", "it answered 302 (a redirect); callbacks must answer with JSON directly", patient),
                ("missing", "it answered 404, not 200", patient),
            ]
            for (path, reason, fetcher) in cases {
                await #expect(throws: CallbackError(url: "\(base)/\(path)", reason: reason), "\(path)") {
                    try await fetcher.startParameters(from: "\(base)/\(path)")
                }
            }
            // A body that trickles in is cut off at the chain's deadline too.
            let start = ContinuousClock.now
            await #expect(throws: CallbackError(url: "\(base)/trickle", reason: "no start parameters within 3 s")) {
                try await fetcher.startParameters(from: "\(base)/trickle")
            }
            #expect(ContinuousClock.now - start < .seconds(5), "the trickle takes 6 s; the deadline is 3 s")
            // Ports outside callbacks.ports are not reached.
            var portLimits = Self.limits(allowLoopback: true)
            portLimits.ports = [80, 443]
            let strict = CallbackFetcher(limits: portLimits)
            defer { Task { await strict.shutdown() } }
            let port = try #require(base.split(separator: ":").last)
            await #expect(
                throws: CallbackError(url: "\(base)/params", reason: "port \(port) is not one callbacks may reach (callbacks.ports: 80, 443)")
            ) { try await strict.startParameters(from: "\(base)/params") }
            for url in ["ftp://127.0.0.1/x", "/params", "http://user:secret@127.0.0.1/x"] {
                await #expect(throws: CallbackError.self, "\(url)") { try await fetcher.startParameters(from: url) }
            }
        }
    }

    @Test("loopback is refused before any connection unless allowed, also by name")
    func loopbackRefused() async throws {
        try await withCallbackServer { base in
            let fetcher = CallbackFetcher(limits: Self.limits(allowLoopback: false))
            defer { Task { await fetcher.shutdown() } }
            let port = base.split(separator: ":").last!
            await #expect(
                throws: CallbackError(
                    url: "\(base)/params",
                    reason: "127.0.0.1 is a loopback address; callbacks may only reach public addresses unless callbacks.allow in the pool's configuration names the network")
            ) { try await fetcher.startParameters(from: "\(base)/params") }
            let byName = await #expect(throws: CallbackError.self) {
                try await fetcher.startParameters(from: "http://localhost:\(port)/params")
            }
            #expect(byName?.reason.hasPrefix("localhost resolves to") == true, "\(String(describing: byName))")
            #expect(byName?.reason.contains("a loopback address") == true)
            await #expect(throws: CallbackError.self) { try await fetcher.startParameters(from: "http://[::1]:\(port)/params") }
        }
    }
}
