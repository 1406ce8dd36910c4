import Foundation
import Logging
import ServiceLifecycle
import Testing
import TestSupport

@testable import Libvirt

@Suite("libvirt event loop")
struct EventLoopTests {
    @Test("the event loop runs as a Service, stops on graceful shutdown, and restarts with the next connection")
    func service() async throws {
        try await SystemLibvirt.exclusive {
            let group = ServiceGroup(services: [EventLoop.shared], gracefulShutdownSignals: [], logger: Logger(label: "test"))
            let running = Task { try await group.run() }
            await group.triggerGracefulShutdown()
            try await running.value
            #expect(!EventLoop.shared.isRunning)

            // Opening a connection starts it again, and events flow.
            let connection = try await Connection.open("test:///default")
            #expect(EventLoop.shared.isRunning)
            let events = EventRecorder(try await connection.events())
            let name = "loop-\(UUID().uuidString.prefix(8).lowercased())"
            let domain = try await connection.defineDomain(xml: TestDriverTests.domainXML(name: name))
            try await events.expect(within: .seconds(10)) {
                if case .domain(let event) = $0 { event.name == name && event.kind == .defined } else { false }
            }
            try await domain.undefine()
            await connection.close()
        }
    }
}
