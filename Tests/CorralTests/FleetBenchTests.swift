import Foundation
import Testing
import TestSupport

/// `corral bench pool` as the fleet check: simulated appliances holding
/// check-ins and users creating instances against real `corral pool serve`
/// processes, one of which is killed (SIGKILL) and started again mid-run.
/// The simulator itself checks the pool's promises and exits 1 on a
/// violation; these tests also read its report.
@Suite("corral bench pool: the simulated fleet checks the pool while a pool process is killed")
struct FleetBenchTests {
    struct Report: Decodable {
        struct Line: Decodable { var count: Int }
        struct Burst: Decodable {
            var created: Int
            var refused: Int
            var unanswered: Int
        }
        struct Checks: Decodable {
            var instancesStarted: Int
            var actionsDelivered: Int
            var doublePlacements: [String]
            var lostPlacements: [String]
            var redelivered: [String]
            var limitBursts: [String: Burst]
            var held: [String: Int]
            var violations: [String]
        }
        var lines: [String: Line]
        var checks: Checks
        var replicaDownSeconds: Double?
        var poolPeakResidentMiB: Int?
    }

    static func bench(_ arguments: [String]) async throws -> Report {
        let result = try await runCorral(
            ["bench", "pool", "--json", "--processes", "--seed", "--appliances", "24", "--instances", "5", "--hold", "2", "--users", "2",
             "--seconds", "10", "--kill-replica-after", "4"] + arguments,
            environment: ["PATH": "/usr/bin:/bin"])
        #expect(result.status == 0, "\(result.stderr)\n\(result.stdout.suffix(3000))")
        let json = try #require(result.stdout.firstIndex(of: "{").map { String(result.stdout[$0...]) }, "\(result.stdout)")
        return try JSONDecoder().decode(Report.self, from: Data(json.utf8))
    }

    static func expectSound(_ report: Report, replicas: Int) {
        let checks = report.checks
        #expect(checks.violations.isEmpty, "\(checks.violations)")
        #expect(checks.doublePlacements.isEmpty && checks.lostPlacements.isEmpty && checks.redelivered.isEmpty)
        // The fleet did work (how much depends on the machine's load: the
        // suite runs at once, and placements on PostgreSQL retry under contention).
        #expect((report.lines["check-ins"]?.count ?? 0) > 24, "\(report.lines)")
        #expect((report.lines["deliveries"]?.count ?? 0) > 0, "\(report.lines)")
        #expect(checks.instancesStarted > 0)
        #expect(report.replicaDownSeconds != nil, "a pool process was killed and came back")
        #expect(report.poolPeakResidentMiB != nil)
        // Two users with a limit of 3 each asked for 6 at once while a pool process died.
        #expect(checks.held.count == 2)
        for (user, held) in checks.held {
            let burst = checks.limitBursts[user]
            #expect(held <= 3, "\(user) holds \(held)")
            #expect((burst?.created ?? 0) <= 3, "\(user): \(String(describing: burst))")
            if replicas > 1 {
                // Most creates reached a live replica: the limit is filled exactly.
                #expect(held == 3, "\(user) holds \(held): \(String(describing: burst))")
            }
        }
    }

    @Test("on SQLite, one pool process killed and restarted: nothing lost, nothing doubled, limits hold")
    func sqlite() async throws {
        let report = try await Self.bench([])
        Self.expectSound(report, replicas: 1)
    }

    @Test("on PostgreSQL, three pool processes, one killed and restarted: nothing lost, nothing doubled, limits exact")
    func postgres() async throws {
        let database = try await ReplicaProcessTests.freshDatabase()
        let report = try await Self.bench(["--database", database, "--replicas", "3"])
        Self.expectSound(report, replicas: 3)
    }
}
