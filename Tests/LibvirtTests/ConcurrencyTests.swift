import Foundation
import Synchronization
import Testing

@testable import Libvirt

@Suite("Blocking calls and concurrency")
struct ConcurrencyTests {
    @Test("blocking work runs off the cooperative pool, which stays free meanwhile")
    func blockingWorkLeavesCooperativePoolFree() async throws {
        // Twice as many sleeping calls as the cooperative pool has threads.
        // Were they on that pool, the heartbeat task below could not run
        // until they had all finished. They sleep 3 s: the rest of the
        // suite, started at the same moment, can keep the pool busy for a
        // second or more (seen in CI), which says nothing about these calls.
        let sleepers = ProcessInfo.processInfo.activeProcessorCount * 2
        let finishedSleepers = Counter()
        let sleepersDoneWhenHeartbeatRan = try await withThrowingTaskGroup(of: Int?.self) { group in
            for _ in 0..<sleepers {
                group.addTask {
                    try await blocking {
                        Thread.sleep(forTimeInterval: 3)
                        finishedSleepers.increment()
                    }
                    return nil
                }
            }
            group.addTask {
                try await Task.sleep(for: .milliseconds(50))
                return finishedSleepers.value
            }
            var heartbeat: Int?
            for try await value in group { if let value { heartbeat = value } }
            return heartbeat
        }
        #expect((sleepersDoneWhenHeartbeatRan ?? sleepers) < sleepers, "the heartbeat waited for every blocking call")
        #expect(finishedSleepers.value == sleepers)
    }

    @Test("hundreds of concurrent calls on one connection all complete")
    func manyConcurrentCalls() async throws {
        let connection = try await Connection.open("test:///default")
        let name = "busy-\(UUID().uuidString.prefix(8).lowercased())"
        let domain = try await connection.defineDomain(xml: TestDriverTests.domainXML(name: name))
        try await domain.start()
        let states = try await withThrowingTaskGroup(of: DomainState.self) { group in
            for index in 0..<400 {
                group.addTask {
                    switch index % 4 {
                    case 0: return try await domain.state()
                    case 1: return try await domain.info().state
                    case 2: return try await connection.domain(named: name).state()
                    default:
                        _ = try await connection.domains()
                        return try await domain.state()
                    }
                }
            }
            return try await group.reduce(into: [DomainState]()) { $0.append($1) }
        }
        #expect(states.count == 400)
        #expect(states.allSatisfy { $0 == .running(.booted) })
        try await domain.destroy()
        try await domain.undefine()
        await connection.close()
    }
}

private final class Counter: Sendable {
    private let count = Atomic<Int>(0)
    func increment() { count.add(1, ordering: .relaxed) }
    var value: Int { count.load(ordering: .relaxed) }
}
