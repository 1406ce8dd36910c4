import AsyncHTTPClient
import Foundation
import Libvirt
import NIOCore
import NIOHTTP1
import Testing
import TestSupport

extension Harness {
    /// A request to the pool's user-facing API as alice; returns the first
    /// item of the reply's `data`.
    @discardableResult
    func v1(_ method: HTTPMethod, _ path: String, body: [String: Any]? = nil, token: String? = nil) async throws -> [String: Any] {
        guard let item = try await v1Data(method, path, body: body, token: token).first else {
            throw SetupError("\(method) \(path) gave no data")
        }
        return item
    }

    /// A user-facing API request as alice (or `token`'s user); the `data` of the reply.
    func v1Data(_ method: HTTPMethod, _ path: String, body: [String: Any]? = nil, token: String? = nil) async throws -> [[String: Any]] {
        var request = HTTPClientRequest(url: poolURL + path)
        request.method = method
        request.headers.add(name: "X-Auth-Token", value: token ?? userToken)
        if let body { request.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: body))) }
        let response = try await http.execute(request, timeout: .seconds(30))
        let data = Data(try await response.body.collect(upTo: 1 << 20).readableBytesView)
        guard (200..<300).contains(response.status.code),
            let envelope = try JSONSerialization.jsonObject(with: data) as? [String: Any],
            let items = envelope["data"] as? [[String: Any]]
        else { throw SetupError("\(method) \(path) failed (\(response.status)): \(String(decoding: data, as: UTF8.self))") }
        return items
    }

    /// Waits until the user-facing API shows the instance with `status`.
    @discardableResult
    func waitForStatus(_ id: String, _ status: String, timeout: Duration = .seconds(120), token: String? = nil) async throws
        -> [String: Any]
    {
        let deadline = ContinuousClock.now + timeout
        var last: [String: Any] = [:]
        while ContinuousClock.now < deadline {
            last = try await v1(.GET, "/v1/server-instance/\(id)", token: token)
            if last["status"] as? String == status { return last }
            try await Task.sleep(for: .milliseconds(250))
        }
        throw SetupError("instance \(id) did not show \(status) within \(timeout); last: \(last)\n\(logs)")
    }
}

@Suite("The user-facing API with a real agent on qemu:///system")
struct AgentUserAPITests {
    @Test("an instance made through /v1/server-instance boots; power-off, power-on and delete through the API reach libvirt")
    func serverInstanceLifecycle() async throws {
        try await withHarness("user-api") { harness, _ in
            try await harness.startAgent()
            let created = try await harness.v1(.POST, "/v1/server-instance", body: ["server-image": "busybox", "server-flavor": "small"])
            let id = try #require(created["id"] as? String)
            let name = try #require(created["hostname"] as? String)
            #expect(created["status"] as? String == "BUILD")

            try await harness.waitForStatus(id, "ACTIVE")
            let domain = try #require(try await harness.domains(named: name).first)
            #expect(try await domain.state().isActive)
            #expect(try await domain.instanceMetadata()?.leaseExpires != nil, "the 7-day lease reached the domain")

            try await harness.v1(.PUT, "/v1/server-instance/\(id)", body: ["task": ["what": "power-off"]])
            try await harness.waitForStatus(id, "SHUTOFF")
            #expect(try await domain.state().isActive == false)

            try await harness.v1(.PUT, "/v1/server-instance/\(id)", body: ["task": ["what": "power-on"]])
            try await harness.waitForStatus(id, "ACTIVE")
            #expect(try await domain.state().isActive)

            try await harness.v1(.DELETE, "/v1/server-instance/\(id)")
            try await harness.waitForStatus(id, "DELETED")
            #expect(try await harness.domains(named: name).isEmpty)
            #expect(harness.instanceFiles().allSatisfy { !$0.contains(name) })
        }
    }
}
